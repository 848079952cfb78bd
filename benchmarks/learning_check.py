"""Does a fresh deformable network learn on a training configuration's pairs?

A few hundred steps of the joint task on freshly drawn pairs, printing the end-point
error against the synthetic truth as a share of the identity's (below 1: it learns).
Isolate one factor at a time with overrides, e.g. the start of the curriculum
(``--at 0``: no augmentation), same-contrast pairs, no heads:

    python benchmarks/learning_check.py configs/embedded_joint_brains.toml --at 0 --same \\
        --set '{"head_prob": 0.0, "shapes_prob": 0.0}' --steps 150

Session 9 found with it that brain pairs with one image's head stripped keep a fresh
U-Net at the identity (ratio 1.00) where pairs keeping both heads (0.95 in 50 steps) and
random shapes (0.82 in 75) learn at once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from synthmorph_nipype.training.config import read_config
from synthmorph_nipype.training.trainer import Trainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", default="{}", help="JSON overrides of the configuration")
    parser.add_argument("--at", type=int, help="curriculum step to draw at (default: its end)")
    parser.add_argument("--same", action="store_true", help="same-contrast pairs")
    parser.add_argument("--lam", type=float, help="fixed lambda (default: U(0, 1) per step)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = read_config(args.config, **{"inter_subject_prob": 0.0, **json.loads(args.set)})
    if cfg.model != "joint" or not cfg.supervised_weight:
        parser.error("needs a joint configuration with supervised_weight > 0")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, log=None)
    task = trainer.task
    synth = cfg.synth_at(cfg.warmup_steps if args.at is None else args.at)[0]
    opt = torch.optim.Adam(task.model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(args.seed)
    ratios, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        pair = trainer._draw(gen, synth, args.same)
        if pair.disp_truth is None:
            continue
        loss, terms = task.loss(pair, gen, trainer.autocast, lam=args.lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ratios.append(terms["epe"] / terms["epe_identity"])
        if step % args.every == 0:
            recent = ratios[-args.every:]
            print(f"step {step:5d}  epe / identity {sum(recent) / len(recent):.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
