"""Whole-process wall time and peak RSS of ``synthmorph register`` against ANTsPy SyN.

Issue 14's speed target is a ratio to SyN in the same run: both commands are run on the
demo pair (the 1 mm template against an oblique, re-contrasted copy; or on MOVING FIXED),
alternating, as separate processes (start-up, reading and writing included), and the
medians of their wall times and peak resident memory are compared:

    bash benchmarks/setup_peers.sh     # ANTsPy in its own venv
    python benchmarks/demo_vs_syn.py --runs 3 --threads 2 --out results.json
    python benchmarks/demo_vs_syn.py MOVING FIXED -- --refine 0 --refine-affine 0

Arguments after ``--`` go to ``synthmorph register`` (default: the joint model with what
its weights recommend, writing the forward transform and the moved image, as SyN does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthmorph_nipype.cli.demo import make_pair

HERE = Path(__file__).resolve().parent
ANTS_PYTHON = Path(os.environ.get("ANTS_VENV", "/work/bench/ants-venv")) / "bin" / "python"


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process (``wait4``'s own figures)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child never blocks
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{cmd[0]} failed: {err.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024 ** 2  # kB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="MOVING FIXED (default: demo pair)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:split]), argv[split + 1:]
    if not ANTS_PYTHON.is_file():
        parser.error(f"{ANTS_PYTHON}: no ANTsPy venv (run benchmarks/setup_peers.sh)")
    ours_exe = shutil.which("synthmorph")
    if ours_exe is None:
        parser.error("synthmorph is not on PATH (install the package)")
    times: dict[str, list[tuple[float, float]]] = {"synthmorph": [], "ants_syn": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        moving, fixed = args.images if args.images else make_pair(tmp)[:2]
        ours = [ours_exe, "register", "-j", str(args.threads), str(moving), str(fixed),
                "-t", str(tmp / "fw.h5"), "-o", str(tmp / "moved.nii.gz"), *extra]
        syn = [str(ANTS_PYTHON), str(HERE / "ants_worker.py"), "register", str(fixed),
               str(moving), str(tmp / "ants"), "--type", "SyN", "--threads", str(args.threads)]
        for run in range(args.runs):
            for name, cmd in (("synthmorph", ours), ("ants_syn", syn)):
                wall, rss = timed(cmd)
                times[name].append((wall, rss))
                print(f"run {run + 1} {name:10s} {wall:6.1f} s  {rss:5.2f} GB", flush=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v))
           for k, v in times.items()}
    ratio = med["ants_syn"][0] / med["synthmorph"][0]
    print(f"median: synthmorph {med['synthmorph'][0]:.1f} s ({med['synthmorph'][1]:.2f} GB), "
          f"ANTsPy SyN {med['ants_syn'][0]:.1f} s ({med['ants_syn'][1]:.2f} GB): "
          f"{ratio:.1f}x faster")
    if args.out:
        args.out.write_text(json.dumps({
            "threads": args.threads, "extra": extra, "runs": times,
            "median_s": {k: v[0] for k, v in med.items()},
            "median_rss_gb": {k: v[1] for k, v in med.items()},
            "syn_over_synthmorph": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
