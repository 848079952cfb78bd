"""The project's own model files: torch checkpoints that carry their configuration.

A checkpoint is a plain dictionary (tensors, numbers, strings, lists), so it loads with
``torch.load(..., weights_only=True)`` and can never run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WeightsError
from .affine import AffineConfig, AffineDetector
from .joint import HyperUNet, UNet, UNetConfig

FORMAT = "synthmorph-nipype"
VERSION = 1
CLASSES = {"AffineDetector": (AffineDetector, AffineConfig), "UNet": (UNet, UNetConfig),
           "HyperUNet": (HyperUNet, UNetConfig)}


def save_checkpoint(path: str | Path, *, affine: AffineDetector | None = None,
                    deform: UNet | HyperUNet | None = None, meta: dict | None = None,
                    half: bool = False) -> None:
    """Save models with their configurations to ``path``; ``half`` stores the floating
    weights in float16 (half the file; loading makes them float32 again, so a model runs
    as before with weights rounded to 11 significant bits)."""
    out: dict = {"format": FORMAT, "version": VERSION, "meta": dict(meta or {})}
    for key, model in (("affine", affine), ("deform", deform)):
        if model is not None:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if half:
                state = {k: v.half() if v.is_floating_point() else v
                         for k, v in state.items()}
            out[key] = {"class": type(model).__name__, "config": model.config.to_dict(),
                        "state_dict": state}
    torch.save(out, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint: ``{'affine': model | None, 'deform': model | None, 'meta': dict}``."""
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    except Exception as err:
        raise WeightsError(f"{path}: not a torch checkpoint ({err.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a synthmorph-nipype checkpoint")
    out = {"affine": None, "deform": None, "meta": raw.get("meta", {})}
    for key in ("affine", "deform"):
        if key not in raw:
            continue
        entry = raw[key]
        if not isinstance(entry, dict):
            raise WeightsError(f"{path}: not a synthmorph-nipype checkpoint ({key!r} entry)")
        cls, cfg_cls = CLASSES.get(entry.get("class"), (None, None))
        if cls is None:
            raise WeightsError(f"{path}: unknown model class {entry.get('class')!r}")
        try:
            model = cls(cfg_cls.from_dict(entry["config"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise WeightsError(f"{path}: invalid model configuration ({err})") from None
        try:  # float16 weights (save_checkpoint(half=True)) become the model's float32
            model.load_state_dict(entry["state_dict"])
        except KeyError:
            raise WeightsError(f"{path}: {key!r} entry holds no weights") from None
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise WeightsError(f"{path}: weights do not fit the stored architecture "
                               f"({first[:160]})") from None
        out[key] = model.eval()
    return out
