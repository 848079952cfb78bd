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
from ..cli.parser import _non_negative, _positive
from ..cli.parser import _unit_interval as _lam
from ..io.templates import DEFAULT_TEMPLATE
from .inputs import EXIT, BIDSAppError

CONTRASTS = ("T1w", "T2w", "FLAIR", "PDw")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _mem_gb(text: str) -> float:
    t = text.strip().lower().rstrip("b")
    scale = {"g": 1.0, "m": 1 / 1024, "t": 1024.0}.get(t[-1:], None)
    try:
        return float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"memory like 8, 8G or 8000M, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="synthmorph-bids", description=(
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
    r.add_argument("--mode", default="joint", choices=("joint", "affine", "rigid"),
                   help="transformation to the template (default: joint)")
    r.add_argument("--regularization", "--lambda", type=_lam, default=0.5, metavar="LAMBDA",
                   help="regularization weight of the deformation, in (0, 1) (default: 0.5)")
    r.add_argument("--extent", type=int, default=256, choices=(192, 256),
                   help="network extent (default: 256)")
    r.add_argument("--weights", nargs="+", metavar="FILE",
                   help="model weights (default: the installed or embedded models)")
    r.add_argument("--refine", type=_non_negative, metavar="N",
                   help="test-time refinement steps of the deformation (default: what the "
                   "weights recommend)")
    r.add_argument("--refine-affine", type=_non_negative, metavar="N",
                   help="test-time refinement steps of the affine (default: what the weights "
                   "recommend)")
    r.add_argument("--refine-similarity", choices=("ncc", "mse", "mind"),
                   help="image similarity of the refinement (default: what the weights "
                   "recommend, else ncc)")
    r.add_argument("--use-gpu", action="store_true",
                   help="registration nodes are GPU nodes (CUDA when present)")
    e = p.add_argument_group("execution")
    e.add_argument("--nprocs", "--nthreads", type=_positive,
                   default=len(os.sched_getaffinity(0)),
                   help="processes at once (default: all cores)")
    e.add_argument("--omp-nthreads", type=_positive, help="threads per registration "
                   "(default: min(8, nprocs - 1), at least 1)")
    e.add_argument("--mem", "--mem-gb", type=_mem_gb, metavar="GB",
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
    args = parse(argv)
    log = logging.getLogger("synthmorph_bids")  # ours only: Nipype logs on its own
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    from .run import run_demo, run_group, run_participant

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


def plugin_settings(args) -> tuple[str, dict]:
    """The Nipype plugin and its arguments from the command line or ``--use-plugin``."""
    if args.use_plugin:
        import yaml

        try:
            data = yaml.safe_load(Path(args.use_plugin).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise BIDSAppError(f"{args.use_plugin}: not a readable plugin file ({err})",
                               "bad_filter") from None
        if not isinstance(data, dict) or "plugin" not in data:
            raise BIDSAppError(f"{args.use_plugin}: needs a 'plugin' key", "bad_filter")
        from nipype.pipeline import plugins

        if not hasattr(plugins, f"{data['plugin']}Plugin"):
            raise BIDSAppError(f"{args.use_plugin}: unknown Nipype plugin "
                               f"{data['plugin']!r}", "bad_filter")
        return str(data["plugin"]), dict(data.get("plugin_args") or {})
    plugin_args = {"n_procs": args.nprocs, "raise_insufficient": False}
    if args.mem:
        plugin_args["memory_gb"] = args.mem
    return ("MultiProc" if args.nprocs > 1 else "Linear"), plugin_args


__all__ = ["EXIT", "build_parser", "main", "parse", "plugin_settings"]
