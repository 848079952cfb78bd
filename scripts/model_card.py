"""Write the model card of the embedded weights from the training runs that made them.

    python scripts/model_card.py runs/affine:synthmorph_nipype/data/synthmorph_nipype.affine.pt \
        runs/joint:synthmorph_nipype/data/synthmorph_nipype.joint.pt \
        > synthmorph_nipype/data/MODEL_CARD.md

Reads each run's ``model.pt`` metadata, ``val.csv`` and ``train.csv``; prints Markdown.
``--previous CARD`` appends the run sections of an earlier card (runs whose folders are
gone but whose weights still ship in part, e.g. a U-Net bundled with a newer detector).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from synthmorph_nipype.models.checkpoint import load_checkpoint


def _rows(path: Path) -> list[dict]:
    """CSV rows, one per step (a resumed run repeats the steps after its checkpoint: the
    last row of each step is the one that counts)."""
    with path.open() as f:
        rows = {r["step"]: r for r in csv.DictReader(f)}
    return list(rows.values())


def _condensed(val: list[dict], every: int | None = None) -> list[dict]:
    """Validation rows every ``every`` steps (5,000 for runs over 20,000 steps, else
    1,000), plus the first and the last."""
    if every is None:
        every = 5000 if val and int(val[-1]["step"]) > 20000 else 1000
    keep = [r for i, r in enumerate(val)
            if i in (0, len(val) - 1) or int(r["step"]) % every == 0]
    return keep


def _brains(cfg: dict) -> str:
    """Where a run's brains came from."""
    if not cfg.get("label_maps"):
        return (f"template brains (with a synthetic head with probability "
                f"{cfg['head_prob']})")
    names = cfg["label_maps"] if isinstance(cfg["label_maps"], list) else [cfg["label_maps"]]
    return ("whole-head label maps of real subjects (" + ", ".join(f"`{n}`" for n in names)
            + "; SynthSeg's training maps, Billot et al. 2023, Apache-2.0; subjects 17-20 "
            f"held out), pairs of two subjects with probability {cfg['inter_subject_prob']}, "
            f"heads kept with probability {cfg['head_prob']} and then stripped per image")


def describe(run: Path, model: Path | None = None) -> list[str]:
    parts = load_checkpoint(model or run / "model.pt")
    meta = parts["meta"]
    cfg = json.loads(meta["training_config"])
    train = _rows(run / "train.csv")
    val = _rows(run / "val.csv") if (run / "val.csv").exists() else []
    seconds = sum(float(r["seconds"]) for r in train)
    lines = [f"## {cfg['model']} (`{run.name}`)", ""]
    for key in ("affine", "deform"):
        model = parts[key]
        if model is None:
            continue
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"- {key}: `{type(model).__name__}` {model.config.to_dict()}, "
                     f"{n:,} parameters")
    decay = (f", cosine decay from step {cfg['lr_decay_start']} to {cfg['lr_final']}"
             if cfg.get("lr_decay_start") is not None else "")
    refine = [f"{meta[k]} {what}" for k, what in (("refine_affine", "affine"),
                                                   ("refine", "deformable"))
              if int(meta.get(k, 0))]
    lines += [
        f"- trained: {meta['trained_steps']} steps of batch 1, Adam lr {cfg['lr']}{decay}, seed "
        f"{cfg['seed']}, {cfg['similarity']} similarity"
        + (f" + lambda x {cfg['regularizer']}" if cfg["model"] == "joint" else "")
        + f", on {meta['date']}, {seconds / 3600:.2f} h of step time "
        f"({torch.__version__}, {cfg['device']} device setting)",
        f"- data: {cfg['grid']}^3 voxels of {cfg['voxel_mm']} mm"
        + (f", random {cfg['crop']}^3 crops" if cfg.get("crop") else "")
        + f"; random shapes with probability {cfg['shapes_prob']}, else " + _brains(cfg)
        + f"; synthesis changes {json.dumps(cfg['synth'])}"
        + (f"; + {cfg['supervised_weight']} x the supervised term (distance to the true "
           "map / end-point error over the brain)" if cfg.get("supervised_weight") else "")
        + (f"; distillation on a share {cfg['distill_prob']} of the steps: + "
           f"{cfg['distill_weight']} x the end-point error to the field "
           f"{cfg['distill_iterations']} steps of the test-time refinement "
           f"({cfg['distill_similarity']}, smoothness weight {cfg['distill_lambda']}) reach "
           "from the U-Net's" if cfg.get("distill_weight") else ""),
        *([f"- started from `{cfg['init_weights']}` (weights trained before: the run "
           "continues them)"]
          if cfg.get("init_weights") and cfg.get("objective") == "synthetic" else []),
        "- test-time refinement it recommends (the default of `synthmorph register`): "
        + (", ".join(refine) + " steps" if refine else "none")
        + (f" (deformable: {meta['refine_similarity']}, smoothness weight "
           f"{meta['refine_lambda']})" if "refine_lambda" in meta and int(meta.get("refine", 0))
           else ""),
        *([f"- the U-Net runs as a cascade of {meta['passes']} passes (`passes`, the "
           "default of `synthmorph register --passes`)"] if int(meta.get("passes", 1)) > 1
          else []),
        "",
    ]
    if val:
        keys = [k for k in val[0] if k != "step"]
        lines += ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in _condensed(val):
            lines.append(f"| {r['step']} | " + " | ".join(f"{float(r[k]):.4f}" for k in keys)
                         + " |")
        lines.append("")
    return lines


def main(runs: list[str], previous: Path | None = None) -> None:
    out = ["# Embedded SynthMorph models", "",
           "Trained by this project from synthetic data alone: images synthesized from label "
           "maps (random shapes, the ICBM152 2009 template nilearn ships and, for the "
           "detector and the U-Net, whole-head label maps of 16 real subjects); no acquired "
           "scans. "
           "Validation is on a fixed set of synthetic pairs of the same kind "
           "(soft Dice of the loss labels, background excluded; `error_vox` is the mean "
           "distance to the known affine over labelled voxels, in voxels of the training "
           "grid; "
           "`folding_pct` the share of non-positive Jacobian determinants at lambda 0.5).",
           "", "Reproduce (CPU, one core each; the runs stop and resume with --max-minutes):",
           "", "```bash",
           "synthmorph train --config configs/embedded_affine.toml --out runs/affine",
           "synthmorph train --config configs/embedded_affine_heads.toml --out runs/affine_heads",
           "python scripts/export_embedded.py configs/embedded_affine_heads.toml \\",
           "    runs/affine_heads synthmorph_nipype/data/synthmorph_nipype.affine.pt \\",
           "    --refine-affine 60",
           "synthmorph train --config configs/embedded_joint_mind.toml --out runs/joint_mind",
           "python scripts/export_embedded.py configs/embedded_joint_mind.toml \\",
           "    runs/joint_mind synthmorph_nipype/data/synthmorph_nipype.joint.pt \\",
           "    --refine 45 --refine-similarity mind --refine-lambda 0.85",
           "python scripts/recommend.py synthmorph_nipype/data/synthmorph_nipype.joint.pt \\",
           "    --passes 3 --refine 30     # session 13: the U-Net as a cascade",
           "```", "",
           "**How they are used.** Trained on a 2-core CPU (the GPU machine was never lent "
           "to this project's training sessions), the networks are small and short-trained: "
           "the affine detector alone lands within about a centimetre on held-out subjects, "
           "and the deformable U-Net (which sees MIND descriptors of the images, not their "
           "intensities: `input_features`) alone reaches a Dice of 0.44-0.58 between "
           "held-out subjects in one pass and 0.52-0.60 (mean 0.568) as a cascade of three "
           "passes (`passes`, the default of `--passes`: each pass sees the pair warped "
           "half-way by the passes before), where a classical affine gives ~0.58 and ANTsPy "
           "SyN 0.52-0.69. "
           "So each model records the test-time refinement it needs "
           "(`refine_affine`, `refine`, `refine_similarity`, `refine_lambda` in its "
           "metadata) and "
           "`synthmorph register` applies it unless told otherwise (`--refine-affine 0 "
           "--refine 0` gives the networks alone): Adam steps of a symmetric MIND similarity "
           "on the affine matrix on 8,192 random voxels per step, N steps at 4 mm and N/2 at "
           "2 mm, and 30 steps of (1 - lambda) MIND + lambda Grad-l2 (lambda 0.85) on the "
           "velocity field at 4 mm. "
           "Figures "
           "against ANTsPy and elastix are in docs/benchmarks.md (`benchmarks/accuracy.py`, "
           "`benchmarks/heldout.py`): on par with ANTsPy SyN for T1 subject-to-template and "
           "cross-subject pairs, affine error below 0.3 mm on held-out heads against "
           "skull-stripped brains when the fixed brain mask is given (`--fixed-mask`, as "
           "the BIDS App and the template workflow do), but worse than SyN on a T2-like "
           "pair, and without a mask a head against a skull-stripped image still fails.", ""]
    for spec in runs:  # RUN or RUN:MODEL (the exported file, when not RUN/model.pt)
        run, _, model = spec.partition(":")
        out += describe(Path(run), Path(model) if model else None)
    if previous is not None:
        text = previous.read_text()
        sections = text[text.index("\n## "):].replace("\n## ", "\n### ").strip()
        out += ["## Earlier runs", "", "From the previous model card (their run folders "
                "are gone); the joint model ships the U-Net of its `joint` run with the "
                "detector above (`scripts/bundle_joint.py`), recommending the detector's "
                "affine refinement and the U-Net's deformable one.", "", sections, ""]
    print("\n".join(out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN[:MODEL]")
    parser.add_argument("--previous", type=Path, metavar="CARD",
                        help="append the run sections of this earlier card")
    args = parser.parse_args()
    main(args.runs, args.previous)
