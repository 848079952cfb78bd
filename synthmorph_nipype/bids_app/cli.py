"""``synthmorph-bids bids_dir output_dir {participant,group}``: the BIDS App.

Conventions of fMRIPrep and the BIDS-Apps specification. Exit codes: 0 success, 2 usage,
3 not a BIDS dataset, 4 no participants match, 5 a requested participant is missing,
6 no usable anatomical image, 7 output directory inside the input dataset, 8 output
not writable, 9 unreadable filter or plugin file, 10 a workflow node failed, 11 template
not available, 12 no model weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .. import __version__
from ..cli.arguments import Parser, memory_gb, non_negative, positive, regularization
from ..io.templates import DEFAULT_TEMPLATE
from ..vocabulary import DETECTOR_MODES, EXTENTS, IMAGE_SIMILARITIES
from .inputs import EXIT, BIDSAppError

CONTRASTS = ("T1w", "T2w", "FLAIR", "PDw")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``synthmorph-bids`` (BIDS-Apps positional arguments, fMRIPrep-style
    options; usage errors are one line, exit code 2)."""
    p = Parser(prog="synthmorph-bids", description=(
        "SynthMorph registration of every anatomical image of a BIDS dataset: the "
        "reference contrast (T1w when present) to a template, the other contrasts onto "
        "it; BIDS derivatives fMRIPrep reuses, and visual reports."))
    p.add_argument("bids_dir", nargs="?", help="the input BIDS dataset")
    p.add_argument("output_dir", nargs="?", help="where the derivatives go")
    p.add_argument("analysis_level", nargs="?", choices=("participant", "group"))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    g = p.add_argument_group("selection")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="participants to process, with or without 'sub-' (default: all)")
    g.add_argument("--session-label", nargs="+", metavar="LABEL",
                   help="sessions to process, with or without 'ses-' (default: all)")
    g.add_argument("--bids-filter-file", metavar="FILE",
                   help="JSON of pybids filters per contrast, as fMRIPrep's")
    g.add_argument("--contrasts", nargs="+", default=list(CONTRASTS), metavar="SUFFIX",
                   help="anatomical contrasts to use, in order of preference for the "
                   "reference (T1w is the reference whenever present; default: "
                   f"{' '.join(CONTRASTS)})")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not validate the dataset while indexing it")
    r = p.add_argument_group("registration")
    r.add_argument("--template", default=DEFAULT_TEMPLATE, metavar="NAME|PATH",
                   help=f"template: {DEFAULT_TEMPLATE} (default, the ICBM 2009a symmetric "
                   "template nilearn ships), a TemplateFlow ID already in "
                   "$TEMPLATEFLOW_HOME (e.g. MNI152NLin2009cAsym:res-1), or an image path")
    r.add_argument("--mode", default="joint", choices=DETECTOR_MODES,
                   help="transformation to the template (default: joint)")
    r.add_argument("--regularization", "--lambda", type=regularization, default=0.5,
                   metavar="LAMBDA",
                   help="regularization weight of the deformation, in (0, 1) (default: 0.5)")
    r.add_argument("--extent", type=int, default=256, choices=EXTENTS,
                   help="network extent (default: 256)")
    r.add_argument("--weights", nargs="+", metavar="FILE",
                   help="model weights (default: the installed or embedded models)")
    r.add_argument("--passes", type=positive, metavar="N",
                   help="runs of the deformable network as a cascade (default: what the "
                   "weights recommend)")
    r.add_argument("--refine", type=non_negative, metavar="N",
                   help="test-time refinement steps of the deformation (default: what the "
                   "weights recommend)")
    r.add_argument("--refine-affine", type=non_negative, metavar="N",
                   help="test-time refinement steps of the affine (default: what the weights "
                   "recommend)")
    r.add_argument("--refine-lambda", type=regularization, metavar="LAMBDA",
                   help="smoothness weight of the refinement, in (0, 1) (default: what the "
                   "weights recommend, else --regularization)")
    r.add_argument("--refine-similarity", choices=IMAGE_SIMILARITIES,
                   help="image similarity of the refinement (default: what the weights "
                   "recommend, else ncc)")
    r.add_argument("--use-gpu", action="store_true",
                   help="registration nodes are GPU nodes (CUDA when present)")
    e = p.add_argument_group("execution")
    e.add_argument("--nprocs", "--nthreads", type=positive,
                   default=len(os.sched_getaffinity(0)),
                   help="processes at once (default: all cores)")
    e.add_argument("--omp-nthreads", type=positive, help="threads per registration "
                   "(default: min(8, nprocs - 1), at least 1)")
    e.add_argument("--mem", "--mem-gb", type=memory_gb, metavar="GB",
                   help="memory for all processes (e.g. 16G)")
    e.add_argument("-w", "--work-dir", default="work", help="Nipype's working directory "
                   "(default: ./work); a rerun with the same one reuses results")
    e.add_argument("--use-plugin", metavar="FILE", help="YAML with 'plugin' and "
                   "'plugin_args' (e.g. SLURM with sbatch_args)")
    e.add_argument("--stop-on-first-crash", action="store_true")
    e.add_argument("--demo", metavar="OUTDIR", help="make a small BIDS dataset from the "
                   "bundled template in OUTDIR/bids and run both levels on it")
    return p


def parse(argv=None) -> argparse.Namespace:
    """Parsed arguments of ``synthmorph-bids`` (``argv`` defaults to ``sys.argv[1:]``),
    with the checks argparse cannot express (positionals unless ``--demo``, contrasts)."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.demo and not (args.bids_dir and args.output_dir and args.analysis_level):
        parser.error("bids_dir, output_dir and analysis_level are required (or --demo OUTDIR)")
    unknown = [c for c in args.contrasts if c not in ("T1w", "T2w", "FLAIR", "PDw",
                                                      "T2starw", "inplaneT1", "inplaneT2")]
    if unknown:
        parser.error(f"unknown contrast(s): {', '.join(unknown)}")
    return args


def main(argv=None) -> int:
    """Run ``synthmorph-bids``; returns the exit code (0, or one of
    :data:`~synthmorph_nipype.errors.BIDS_EXIT` with a one-line message)."""
    args = parse(argv)
    log = logging.getLogger("synthmorph_bids")  # ours only: Nipype logs on its own
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    from .run import run_group, run_participant

    try:
        if args.demo:
            return run_demo(args)
        if args.analysis_level == "group":
            return run_group(args)
        return run_participant(args)
    except BIDSAppError as err:
        print(f"synthmorph-bids: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("synthmorph-bids: interrupted", file=sys.stderr)
        return 130


def run_demo(args) -> int:
    """``--demo OUTDIR``: a small BIDS dataset made from the bundled template, then both
    analysis levels on it, with the execution options given."""
    from .demo import make_demo_dataset
    from .run import run_group, run_participant

    root = Path(args.demo).resolve()
    bids = make_demo_dataset(root / "bids")
    out, work = root / "derivatives", root / "work"
    common = ["--work-dir", str(work), "--nprocs", str(args.nprocs), "--extent",
              str(args.extent)]
    if args.omp_nthreads:
        common += ["--omp-nthreads", str(args.omp_nthreads)]
    if args.weights:
        common += ["--weights", *args.weights]
    if args.mode != "joint":
        common += ["--mode", args.mode]
    code = run_participant(parse([str(bids), str(out), "participant", *common]))
    if code == 0:
        code = run_group(parse([str(bids), str(out), "group"]))
    if code == 0:
        print(f"synthmorph-bids demo: reports in {out} (open {out / 'group_report.html'} "
              f"and {out}/sub-*.html)")
    return code


__all__ = ["EXIT", "build_parser", "main", "parse", "run_demo"]
