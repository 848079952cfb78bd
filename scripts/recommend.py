"""Set the test-time refinement a weights file recommends (its metadata), weights kept.

    python scripts/recommend.py synthmorph_nipype/data/synthmorph_nipype.joint.pt \\
        --refine 45

``synthmorph register`` applies a model's recommendation unless told otherwise
(``refine_affine``: steps at 4 mm, half as many at 2 mm; ``refine``: deformable steps;
``refine_similarity``; ``refine_lambda``: the deformable refinement's smoothness
weight; ``passes``: runs of the deformable network as a cascade, ``refine_passes``: as
many when its field is refined); benchmarks choose the figures, this records them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from synthmorph_nipype.io.atomic import OutputSet
from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint
from synthmorph_nipype.ops.similarity import IMAGE_SIMILARITIES
from synthmorph_nipype.training.trainer import RECOMMENDATIONS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--refine", type=int)
    parser.add_argument("--refine-affine", type=int)
    parser.add_argument("--refine-similarity", choices=IMAGE_SIMILARITIES)
    parser.add_argument("--refine-lambda", type=float)
    parser.add_argument("--passes", type=int, help="runs of the U-Net as a cascade")
    parser.add_argument("--refine-passes", type=int,
                        help="runs of the U-Net as a cascade before a refinement")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.weights)
    meta = dict(model["meta"])
    for key in RECOMMENDATIONS:
        if getattr(args, key) is not None:
            meta[key] = getattr(args, key)
    with OutputSet() as out:
        save_checkpoint(out.temp(args.weights), meta=meta, affine=model["affine"],
                        deform=model["deform"])
    print(f"{args.weights}: recommends " + ", ".join(
        f"{k} {meta[k]}" for k in RECOMMENDATIONS if k in meta))


if __name__ == "__main__":
    main()
