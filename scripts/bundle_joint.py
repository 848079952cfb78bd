"""Put another affine detector into a joint model file (its U-Net and settings kept).

    python scripts/bundle_joint.py synthmorph_nipype/data/synthmorph_nipype.joint.pt \\
        runs/affine_heads/model.pt synthmorph_nipype/data/synthmorph_nipype.joint.pt

The joint model's detector is what aligns the pair before its deformable network; a
better detector makes a better joint model without retraining the U-Net (trained on
pairs that differ by a small residual affine). The detector's refinement advice
(``refine_affine``) comes along. ``--half`` stores the weights in float16 (a wide
U-Net fits the package's size budget).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from synthmorph_nipype.io.atomic import OutputSet
from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("joint", type=Path)
    parser.add_argument("detector", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--half", action="store_true",
                        help="store the weights in float16 (half the file)")
    args = parser.parse_args(argv)
    joint, detector = load_checkpoint(args.joint), load_checkpoint(args.detector)
    if joint["deform"] is None or detector["affine"] is None:
        parser.error("the first file needs a deformable network, the second a detector")
    meta = dict(joint["meta"])
    for key in ("refine_affine",):
        if key in detector["meta"]:
            meta[key] = detector["meta"][key]
    meta["detector_from"] = args.detector.name
    meta["detector_training_config"] = detector["meta"].get("training_config", "")
    with OutputSet() as out:
        save_checkpoint(out.temp(args.out), meta=meta, half=args.half, affine=detector["affine"],
                        deform=joint["deform"])
    print(f"{args.out}: {args.detector.name}'s detector + {args.joint.name}'s U-Net")


if __name__ == "__main__":
    main()
