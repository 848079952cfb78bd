"""``synthmorph synth`` (look at training pairs) and ``synthmorph train``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..engine.device import set_threads
from ..errors import SynthMorphError
from ..io.atomic import OutputSet
from ..training.config import read_config
from ..training.data import grid_matrix
from ..training.trainer import Trainer, label_source, make_pair, resumes_without_start


def _outdir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SynthMorphError(f"{out}: cannot create the output directory "
                              f"({err.strerror})") from None
    return out


def synth(args: argparse.Namespace) -> None:
    """Write ``args.count`` synthetic pairs (images and label maps) as NIfTI."""
    cfg = read_config(args.config, model=args.model, seed=args.seed,
                      label_maps=args.label_maps)
    out = _outdir(args.outdir)
    set_threads(args.threads)
    source, synth_cfg = label_source(cfg), cfg.synth_config()
    gen = torch.Generator().manual_seed(cfg.seed)
    affine = grid_matrix((cfg.grid,) * 3, cfg.voxel_mm, np.zeros(3))
    with OutputSet() as files:
        for n in range(args.count):
            pair = make_pair(source, synth_cfg, gen, torch.device("cpu"))
            for k, (img, lab) in enumerate(((pair.image_1, pair.labels_1),
                                            (pair.image_2, pair.labels_2)), start=1):
                image = img[0, 0].numpy().astype(np.float32)
                labels = lab[0].numpy().astype(np.int16)
                for name, data in ((f"pair{n:03d}_image_{k}.nii.gz", image),
                                   (f"pair{n:03d}_labels_{k}.nii.gz", labels)):
                    nib.save(nib.Nifti1Image(data, affine), files.temp(out / name))
    print(f"wrote {args.count} pairs to {out} ({cfg.grid}^3 voxels of {cfg.voxel_mm} mm)")


def train(args: argparse.Namespace) -> None:
    """Train (or resume), then export ``model.pt``."""
    cfg = read_config(args.config, model=args.model, steps=args.steps, seed=args.seed,
                      device=args.device, threads=args.threads,
                      affine_weights=args.affine_weights, objective=args.objective,
                      images=args.images, init_weights=args.init_weights,
                      similarity=args.similarity,
                      spatial_lambda=True if args.spatial_lambda else None,
                      prior_alpha=args.prior_alpha, penalty_weight=args.penalty_weight,
                      label_maps=args.label_maps)
    if cfg.model == "joint" and cfg.affine_weights and not Path(cfg.affine_weights).is_file():
        raise SynthMorphError(f"{cfg.affine_weights}: affine weights not found (train the "
                              "affine model first, or leave --affine-weights out)")
    # a resumed run needs its starting weights no more (checked before --restart acts)
    resuming = not args.restart and resumes_without_start(cfg, args.out)
    starts = [cfg.init_weights] if isinstance(cfg.init_weights, str) else cfg.init_weights
    for path in (*([] if resuming else starts or []), cfg.images):
        if path and not Path(path).exists():
            raise SynthMorphError(f"{path}: not found")
    out = _outdir(args.out)
    if args.restart:
        for name in ("checkpoint.pt", "train.csv", "val.csv", "log.jsonl"):
            (out / name).unlink(missing_ok=True)
    try:
        trainer = Trainer(cfg, out)
        resumed = trainer.resume()
    except ValueError as err:
        raise SynthMorphError(str(err)) from None
    if resumed:
        print(f"resuming at step {trainer.step} from {out / 'checkpoint.pt'}", file=sys.stderr)
    try:
        metrics = trainer.run(progress=not args.quiet, max_minutes=args.max_minutes)
    except FloatingPointError as err:  # diverged: the last checkpoint is still there
        raise SynthMorphError(f"{out}: training diverged ({err}); checkpoint.pt holds the "
                              "last saved step, try a lower lr") from None
    if trainer.stopped:
        print(f"stopped by {trainer.stopped} after step {trainer.step} of {cfg.steps}: "
              f"{out / 'checkpoint.pt'} saved, the same command resumes", file=sys.stderr)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"trained {cfg.model} for {trainer.step} steps -> {out / 'model.pt'}"
          + (f" (validation: {summary})" if summary else ""))
