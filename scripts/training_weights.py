"""Keep a large run's network in the repository at a milestone, and resume from it.

    # end of a session: the network of runs/joint_wide in float16, its logs beside it
    python scripts/training_weights.py save runs/joint_wide \
        training_state/joint_wide/unet_fp16.pt
    # next session: a checkpoint at that step (fresh optimizer), then train on
    python scripts/training_weights.py restore configs/embedded_joint_wide.toml \
        training_state/joint_wide/unet_fp16.pt runs/joint_wide
    synthmorph train --config configs/embedded_joint_wide.toml --out runs/joint_wide

(see :mod:`synthmorph_nipype.training.milestone`; copy the run's ``val.csv``,
``log.jsonl`` and ``train.csv`` along to keep its curves in one place).
"""

from __future__ import annotations

import argparse
import sys

from synthmorph_nipype.errors import SynthMorphError
from synthmorph_nipype.training.config import read_config
from synthmorph_nipype.training.milestone import restore_checkpoint, save_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="a run's network (float16) from its checkpoint")
    save.add_argument("run", help="training folder holding checkpoint.pt")
    save.add_argument("weights", help="weights file to write")
    save.add_argument("--float32", action="store_true", help="keep full precision")
    restore = sub.add_parser("restore", help="a checkpoint from saved weights")
    restore.add_argument("config", help="the run's configuration")
    restore.add_argument("weights", help="weights file written by save")
    restore.add_argument("run", help="training folder to write checkpoint.pt into")
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            step = save_weights(args.run, args.weights, half=not args.float32)
            print(f"{args.weights}: step {step}")
        else:
            step = restore_checkpoint(read_config(args.config), args.weights, args.run)
            print(f"{args.run}/checkpoint.pt: step {step}, fresh optimizer")
    except SynthMorphError as err:
        print(f"training_weights.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
