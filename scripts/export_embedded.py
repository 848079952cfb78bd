"""Export a finished training run as an embedded model, with the test-time refinement it
recommends written into its metadata (``synthmorph register`` applies it by default).

    python scripts/export_embedded.py configs/embedded_affine.toml runs/affine \\
        synthmorph_nipype/data/synthmorph_nipype.affine.pt --refine-affine 30
    python scripts/export_embedded.py configs/embedded_joint.toml runs/joint \\
        synthmorph_nipype/data/synthmorph_nipype.joint.pt --refine 30 \\
        --affine-weights synthmorph_nipype/data/synthmorph_nipype.affine.pt
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from synthmorph_nipype.ops.similarity import IMAGE_SIMILARITIES
from synthmorph_nipype.training.config import read_config
from synthmorph_nipype.training.trainer import RECOMMENDATIONS, Trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--refine-affine", type=int, default=0)
    parser.add_argument("--refine", type=int, default=0)
    parser.add_argument("--refine-similarity", choices=IMAGE_SIMILARITIES)
    parser.add_argument("--refine-lambda", type=float)
    parser.add_argument("--passes", type=int, help="runs of the U-Net as a cascade")
    parser.add_argument("--refine-passes", type=int,
                        help="runs of the U-Net as a cascade before a refinement")
    parser.add_argument("--affine-weights", help="joint: the detector to bundle")
    args = parser.parse_args(argv)
    config = read_config(args.config)
    if args.affine_weights:
        config = replace(config, affine_weights=args.affine_weights)
    trainer = Trainer(config, args.run)
    if not trainer.resume():
        parser.error(f"{args.run}: no checkpoint.pt")
    metrics = trainer.validate()
    extra = {f"val_{k}": round(v, 5) for k, v in metrics.items()}
    for key in RECOMMENDATIONS:
        if getattr(args, key):
            extra[key] = getattr(args, key)
    trainer.export(path=args.out, extra=extra)
    print(f"{args.out}: step {trainer.step}, {extra}")


if __name__ == "__main__":
    main()
