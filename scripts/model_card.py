"""Write the model card of the embedded weights from the training runs that made them.

    python scripts/model_card.py runs/affine runs/joint > synthmorph_nipype/data/MODEL_CARD.md

Reads each run's ``model.pt`` metadata, ``val.csv`` and ``train.csv``; prints Markdown.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from synthmorph_nipype.models.checkpoint import load_checkpoint


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def describe(run: Path) -> list[str]:
    parts = load_checkpoint(run / "model.pt")
    meta = parts["meta"]
    cfg = json.loads(meta["training_config"])
    train = _rows(run / "train.csv")
    val = _rows(run / "val.csv") if (run / "val.csv").exists() else []
    seconds = sum(float(r["seconds"]) for r in train)
    lines = [f"### {cfg['model']} (`{run.name}`)", ""]
    for key in ("affine", "deform"):
        model = parts[key]
        if model is None:
            continue
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"- {key}: `{type(model).__name__}` {model.config.to_dict()}, "
                     f"{n:,} parameters")
    lines += [
        f"- trained: {meta['trained_steps']} steps of batch 1, Adam lr {cfg['lr']}, seed "
        f"{cfg['seed']}, {cfg['similarity']} similarity"
        + (f" + lambda x {cfg['regularizer']}" if cfg["model"] == "joint" else "")
        + f", on {meta['date']}, {seconds / 3600:.2f} h of step time "
        f"({torch.__version__}, {cfg['device']} device setting)",
        f"- data: {cfg['grid']}^3 voxels of {cfg['voxel_mm']} mm"
        + (f", random {cfg['crop']}^3 crops" if cfg.get("crop") else "")
        + f"; random shapes with probability {cfg['shapes_prob']}, else template brains "
        f"(with a synthetic head with probability {cfg['head_prob']}); synthesis changes "
        f"{json.dumps(cfg['synth'])}",
        "",
    ]
    if val:
        keys = [k for k in val[0] if k != "step"]
        lines += ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in val:
            lines.append(f"| {r['step']} | " + " | ".join(f"{float(r[k]):.4f}" for k in keys)
                         + " |")
        lines.append("")
    return lines


def main(runs: list[str]) -> None:
    out = ["# Embedded SynthMorph models", "",
           "Trained by this project from synthetic data alone (label maps from random shapes "
           "and from the ICBM152 2009 template nilearn ships; no acquired scans). "
           "Validation is on a fixed set of synthetic pairs of the same kind "
           "(soft Dice of the loss labels, background excluded; `error_vox` is the mean "
           "distance to the known affine over labelled voxels in 2 mm voxels; "
           "`folding_pct` the share of non-positive Jacobian determinants at lambda 0.5).",
           "", "Reproduce with `synthmorph train --config configs/embedded_affine.toml "
           "--out runs/affine` and `synthmorph train --config configs/embedded_joint.toml "
           "--out runs/joint --affine-weights runs/affine/model.pt`.", ""]
    for run in runs:
        out += describe(Path(run))
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
