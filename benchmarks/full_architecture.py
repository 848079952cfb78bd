"""Wall time and peak memory of one registration with the full official architecture.

The networks have the widths of FreeSurfer's models (detector: 64 features, 256 filters;
U-Net: 256 filters at every level) with random weights: speed and memory do not depend on
the values. Each run is a fresh ``synthmorph register`` process on the demo pair (the 1 mm
template and an oblique, anisotropic, re-contrasted copy), timed from the outside,
including start-up and I/O; peak RSS comes from ``wait4``. Extents 192 and 256 run in the
same session, so their ratio is measured under the same conditions.

    python benchmarks/full_architecture.py --extent 192 256 --runs 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from synthmorph_nipype.cli.demo import make_pair
from synthmorph_nipype.models import AffineConfig, AffineDetector, UNet, UNetConfig
from synthmorph_nipype.models.checkpoint import save_checkpoint


def run_once(cmd: list[str], threads: int) -> tuple[float, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {status}")
    return wall, usage.ru_maxrss / 1024**2  # kB -> GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extent", type=int, nargs="+", default=[192, 256])
    parser.add_argument("--mode", default="joint", choices=("joint", "affine", "deform"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        moving, fixed, _ = make_pair(tmp)
        torch.manual_seed(0)
        weights = tmp / "full.pt"
        save_checkpoint(weights, affine=AffineDetector(AffineConfig()),
                        deform=UNet(UNetConfig()))
        results = {}
        for extent in args.extent:
            cmd = [sys.executable, "-m", "synthmorph_nipype.cli.main", "register", "-m",
                   args.mode, "-e", str(extent), "-j", str(args.threads), "-w", str(weights),
                   "-t", str(tmp / "fw.h5"), "-T", str(tmp / "bw.h5"),
                   "-o", str(tmp / "moved.nii.gz"), str(moving), str(fixed)]
            if args.gpu:
                cmd.append("-g")
            runs = [run_once(cmd, args.threads) for _ in range(args.runs)]
            walls, rss = [r[0] for r in runs], [r[1] for r in runs]
            results[extent] = {"wall_s": walls, "median_wall_s": statistics.median(walls),
                               "peak_rss_gb": rss, "median_peak_rss_gb": statistics.median(rss)}
            print(f"{args.mode} extent {extent}: median {statistics.median(walls):.1f} s, "
                  f"peak RSS {statistics.median(rss):.2f} GB (runs: "
                  + ", ".join(f"{w:.1f}" for w in walls) + ")", flush=True)
        if len(results) == 2:
            a, b = (results[e]["median_wall_s"] for e in args.extent)
            print(f"time ratio extent {args.extent[1]} / {args.extent[0]}: {b / a:.2f}")
        if args.json:
            args.json.write_text(json.dumps({"mode": args.mode, "threads": args.threads,
                                             "device": "cuda" if args.gpu else "cpu",
                                             "results": results}, indent=1))


if __name__ == "__main__":
    main()
