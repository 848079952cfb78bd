"""Accuracy and speed of SynthMorph, ANTsPy and elastix on brain pairs with a known answer.

Pairs are made from the ICBM152 template nilearn ships (T1, tissue probability maps, brain
mask): a moving image is the template (re-contrasted, with a synthetic head, or on thick
slices) pulled through a known random affine and/or smooth warp; the fixed image is the
template or another known deformation of it. Tissue labels (CSF=1, GM=2, WM=3) travel with
the images. (nilearn's template is skull-stripped; the "skull" pair adds a synthetic head.)
Each pair lives in ``OUT/pairs/NAME`` (``fixed.nii.gz``, ``moving.nii.gz``,
``fixed_labels.nii.gz``, ``moving_labels.nii.gz``, the true fixed-to-moving mapping as an
ITK displacement field ``true_fwd.nii.gz`` and, for affine pairs, ``true_fwd_ras.txt``, a
4x4 RAS matrix, fixed point -> moving point).

Every method runs as a separate process (wall time and peak RSS of that process, from GNU
``time``, include start-up and I/O), with the same number of threads:

* ``synthmorph-joint``, ``synthmorph-affine``: ``synthmorph register`` (``-t fwd.h5 -o``);
* ``ants-syn``, ``ants-affine``: ANTsPy ``registration`` (``SyN``, ``Affine``; ANTsPy
  defaults) in its own venv through ``benchmarks/ants_worker.py``;
* ``elastix``, ``elastix-affine``: the elastix binary, affine (+ B-spline), Mattes MI.

After each run, untimed, the method's forward transform is turned into a dense displacement
on the fixed grid by one helper (SimpleITK; the ANTs transforms composed by
antsApplyTransforms, elastix's by ``transformix -def all``), from which come: tissue Dice of
the moving labels pulled onto the fixed grid (nearest neighbour), the share of voxels with
a non-positive Jacobian determinant, and the error in mm against the true mapping over the
fixed brain. The labels are also warped by each tool itself (``synthmorph apply``,
``ants.apply_transforms``, transformix) as a check on the field conventions.

Results go to ``OUT/results.json`` (every run, rewritten after each) and ``OUT/results.md``;
logs to ``OUT/logs``; each run's files are deleted after measuring unless ``--keep``.
Pairs are made once per OUT and resolution and reused.

    bash benchmarks/setup_peers.sh            # ANTsPy venv, elastix, GNU time
    python benchmarks/accuracy.py --out bench_out --weights-affine A.pt --weights-joint J.pt
    python benchmarks/accuracy.py --out smoke --quick --pairs skull --methods ants-affine
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from bench.methods import DEFAULT_METHODS, METHODS, Context
from bench.metrics import PairData
from bench.pairs import PAIRS, load_template, make_pair, pair_is_current, write_training_set
from bench.report import markdown, summarize
from bench.run import environment, run_one


def _comma_list(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(bad) or '(empty)'}; choose from {', '.join(choices)}")
        return items
    return parse


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, make the pairs, run every method on every pair, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--resolution", type=int, choices=(1, 2),
                        help="template resolution in mm (default 1; 2 with --quick)")
    parser.add_argument("--repeats", type=int, help="runs per (pair, method) (default 3; "
                        "1 with --quick)")
    parser.add_argument("--methods", type=_comma_list(list(METHODS)), default=DEFAULT_METHODS,
                        help=f"comma list of {', '.join(METHODS)} (default: "
                        f"{', '.join(DEFAULT_METHODS)})")
    parser.add_argument("--pairs", type=lambda t: [n for n in t.split(",") if n],
                        default=list(PAIRS),
                        help=f"comma list of {', '.join(PAIRS)} (default: all), or pairs "
                        "already in OUT/pairs (benchmarks/heldout.py writes held-out ones)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every method")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 mm, 1 run, fewer ANTs/elastix iterations, extent 192")
    parser.add_argument("--extent", type=int, choices=(192, 256),
                        help="synthmorph network extent (default 256; 192 with --quick)")
    parser.add_argument("--weights-affine", action="append", metavar="FILE",
                        help="synthmorph -w for synthmorph-affine (repeatable; default: the "
                        "package's own weights)")
    parser.add_argument("--weights-joint", action="append", metavar="FILE",
                        help="synthmorph -w for synthmorph-joint (repeatable)")
    parser.add_argument("--weights-finetuned", action="append", metavar="FILE",
                        help="synthmorph -w for synthmorph-joint-finetuned")
    parser.add_argument("--weights-svr", action="append", metavar="FILE",
                        help="synthmorph -w for synthmorph-joint-svr")
    parser.add_argument("--ants-python", type=Path, default=Path(
        os.environ.get("ANTS_VENV", "/work/bench/ants-venv")) / "bin" / "python",
        help="Python of the ANTsPy venv (default: $ANTS_VENV/bin/python, "
        "ANTS_VENV=/work/bench/ants-venv)")
    parser.add_argument("--gpu", action="store_true",
                        help="run the synthmorph methods on the GPU (default: CPU, like the peers)")
    parser.add_argument("--keep", action="store_true", help="keep each run's output files")
    parser.add_argument("--training-set", type=int, metavar="N",
                        help="instead of benchmarking, write N deformed template subjects to "
                        "OUT (images for `synthmorph train --objective similarity`)")
    args = parser.parse_args(argv)
    resolution = args.resolution or (2 if args.quick else 1)
    if args.training_set:
        write_training_set(args.out, args.training_set, resolution)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(threads=args.threads, quick=args.quick,
                  extent=args.extent or (192 if args.quick else 256),
                  weights={"affine": args.weights_affine, "joint": args.weights_joint,
                           "finetuned": args.weights_finetuned, "svr": args.weights_svr},
                  ants_python=args.ants_python, work=out, gpu=args.gpu)

    methods, skipped = {}, {}
    for name in args.methods:
        method = METHODS[name]()
        reason = method.check(ctx)
        if reason:
            skipped[name] = reason
            print(f"skipping {name}: {reason}", flush=True)
        else:
            methods[name] = method

    print(f"making pairs ({resolution} mm) in {out / 'pairs'}", flush=True)
    tpl = None
    pairs: dict[str, PairData] = {}
    for name in args.pairs:
        if name not in PAIRS:  # made by another script (benchmarks/heldout.py)
            if not (out / "pairs" / name / "pair.json").is_file():
                parser.error(f"unknown pair {name}: not one of {', '.join(PAIRS)} and not "
                             f"in {out / 'pairs'}")
            pairs[name] = PairData.load(out / "pairs" / name)
            continue
        if not pair_is_current(out / "pairs" / name, resolution):
            tpl = tpl or load_template(resolution)
        pairs[name] = PairData.load(make_pair(name, tpl, resolution, out / "pairs"))
    del tpl

    results = {"config": {"resolution": resolution, "repeats": repeats, "threads": args.threads,
                          "quick": args.quick, "extent": ctx.extent, "gpu": args.gpu,
                          "weights": {k: v for k, v in ctx.weights.items() if v},
                          "methods": args.methods, "pairs": args.pairs},
               "environment": environment(methods, ctx),
               "pairs": {name: dict(p.info, dice_before=p.dice_before(),
                                   dice_truth=p.dice_truth())
                         for name, p in pairs.items()},
               "skipped": skipped, "runs": []}

    def save() -> None:
        results["summary"] = summarize(results["runs"])
        (out / "results.json").write_text(json.dumps(results, indent=1))

    for rep in range(repeats):
        for pair in pairs.values():
            for method in methods.values():
                record = run_one(method, pair, rep, ctx, args.keep)
                results["runs"].append(record)
                msg = (f"Dice {record['dice']['mean']:.3f}, error "
                       f"{record.get('error_mm_mean', float('nan')):.2f} mm"
                       if record["status"] == "ok" else record["reason"])
                print(f"[{rep + 1}/{repeats}] {pair.path.name} {method.name}: "
                      f"{record['wall_s']:.1f} s, {record['peak_rss_gb']:.2f} GB, {msg}",
                      flush=True)
                save()
    save()
    report = markdown(results)
    (out / "results.md").write_text(report)
    print()
    print(report)


if __name__ == "__main__":
    main()
