"""A run's network at a milestone, small enough to commit, and back to a checkpoint.

A training checkpoint holds the model, Adam's two moments (twice the model again) and
the generator's state. A run too large to commit whole keeps its network only, in float16
(:func:`save_weights`: ``format``, ``step``, ``config``, ``model``); a later session turns
that back into a checkpoint (:func:`restore_checkpoint`) at the same step and settings,
with a fresh optimizer and a generator seeded from the run's seed and the step: the
curriculum and learning-rate schedule go on where they were, the optimizer starts again
(not a bit-exact resume: the original draws are not recoverable).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..io.atomic import OutputSet
from .config import TrainConfig
from .trainer import Trainer, other_settings, read_checkpoint

WEIGHTS = "synthmorph-nipype-training-weights"


def save_weights(outdir: str | Path, path: str | Path, *, half: bool = True) -> int:
    """Write the network of the checkpoint in ``outdir`` to ``path`` (float16 with
    ``half``); returns its step."""
    try:
        state = read_checkpoint(Path(outdir) / "checkpoint.pt")
    except ValueError as err:
        raise InputError(str(err)) from None
    model = {k: v.half() if half and v.is_floating_point() else v
             for k, v in state["model"].items()}
    with OutputSet() as out:
        torch.save({"format": WEIGHTS, "step": int(state["step"]),
                    "config": state["config"], "model": model}, out.temp(Path(path)))
    return int(state["step"])


def restore_checkpoint(config: TrainConfig, weights: str | Path, outdir: str | Path) -> int:
    """Write ``outdir/checkpoint.pt`` from the weights file of :func:`save_weights` (made
    with ``config``'s settings, the resumable ones aside); returns its step. An existing
    checkpoint is never overwritten."""
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or not {"step", "config", "model"} <= saved.keys():
        raise InputError(f"{weights}: not a weights file with step, config and model")
    diff = other_settings(saved["config"], config)
    if diff:
        raise InputError(f"{weights}: made with other settings ({', '.join(diff)})")
    out = Path(outdir)
    if (out / "checkpoint.pt").exists():
        raise InputError(f"{out / 'checkpoint.pt'}: exists; not overwritten")
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, out)
    trainer.task.model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in saved["model"].items()})
    trainer.step = int(saved["step"])
    trainer.generator.manual_seed(config.seed + trainer.step)
    trainer.save()
    return trainer.step
