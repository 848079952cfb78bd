"""Where the time of one ``synthmorph register`` goes: a cProfile of the whole command.

Runs the command line in this process (start-up excluded, I/O included) under cProfile
and reports the cumulative time of the stages of a registration - conforming, the
networks, the affine and the deformable refinement (and inside them the integrations,
the sampling, the similarity and the backward passes), the world-space fields and the
writing - as seconds and as a share of the whole run. Each stage is one function of the
package, so the shares stay comparable across versions:

    python benchmarks/profile_register.py --threads 2 --out profile.json
    python benchmarks/profile_register.py MOVING FIXED --threads 1 -- --refine 15

Without images it profiles the demo pair (the 1 mm template against an oblique,
re-contrasted copy). Arguments after ``--`` go to ``synthmorph register``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from synthmorph_nipype.cli.demo import make_pair
from synthmorph_nipype.cli.main import main as cli_main

# stage -> (module path suffix, function name)
STAGES = {
    "conform": ("engine/conform.py", "conform"),
    "detector": ("models/affine.py", "forward"),
    "refine_matrix": ("engine/refine.py", "refine_matrix"),
    "unet": ("engine/network.py", "_svf"),
    "refine_svf": ("engine/refine.py", "refine_svf"),
    "integrate_svf": ("ops/integrate.py", "integrate_svf"),
    "similarity": ("engine/refine.py", "compare"),
    "mind": ("ops/similarity.py", "mind"),
    "backward": ("torch/_tensor.py", "backward"),
    "world_field": ("engine/compose.py", "world_field"),
    "save_transform": ("transforms/io.py", "save_transform"),
    "resample": ("engine/resample.py", "resample"),
}


def stage_times(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each stage (summed over the functions that match it; a
    recursive function counts once, as cProfile's cumulative time does)."""
    out = dict.fromkeys(STAGES, 0.0)
    for (path, _, name), (_, _, _, cum, _) in stats.stats.items():
        for stage, (suffix, func) in STAGES.items():
            if name == func and path.replace("\\", "/").endswith(suffix):
                out[stage] += cum
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="MOVING FIXED (default: demo pair)")
    parser.add_argument("--mode", default="joint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--top", type=int, default=0, help="also print the N slowest functions")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1:]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.images:
            moving, fixed = args.images
        else:
            moving, fixed, _ = make_pair(tmp)
        cmd = ["register", "-m", args.mode, "-t", str(tmp / "fw.h5"),
               "-o", str(tmp / "moved.nii.gz"), "-j", str(args.threads),
               str(moving), str(fixed), *extra]
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        rc = cli_main(cmd)
        prof.disable()
        wall = time.perf_counter() - start
    if rc:
        print(f"synthmorph {' '.join(cmd)} failed ({rc})", file=sys.stderr)
        return rc
    stats = pstats.Stats(prof)
    stages = stage_times(stats)
    print(f"synthmorph {' '.join(cmd[:3])} ... {' '.join(extra)}: {wall:.1f} s "
          f"on {args.threads} thread(s)")
    for stage, sec in stages.items():
        if sec:
            print(f"  {stage:16s} {sec:7.2f} s  {100 * sec / wall:5.1f} %")
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)
    if args.out:
        args.out.write_text(json.dumps({"command": cmd[:3] + extra, "threads": args.threads,
                                        "torch": torch.__version__, "wall_s": wall,
                                        "stages_s": stages}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
