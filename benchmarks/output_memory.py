"""Peak memory and time of ``synthmorph register`` writing resampled outputs onto a large
grid, against the same registration writing the transform alone (the peer in the same
run): issue 16's 512^3 case, a 0.5 mm moving image.

The moving image is nilearn's template resampled to ``--size``^3 voxels of ``--voxel``
mm; the fixed image is the template at 1 mm. Each configuration runs ``--repeats``
times as its own process (peak RSS from ``getrusage`` of the child, wall time around
it); the report gives medians and the ratio of each configuration to ``-t`` alone.

    python benchmarks/output_memory.py --out /tmp/outmem --modes affine joint
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

LAUNCHER = ("import resource, subprocess, sys; "
            "rc = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")


def make_inputs(out: Path, size: int, voxel: float) -> tuple[Path, Path]:
    from nilearn.datasets import load_mni152_template

    fixed, moving = out / "fixed.nii.gz", out / f"moving_{size}.nii.gz"
    tpl = load_mni152_template(resolution=1)
    if not fixed.exists():
        nb.save(nb.Nifti1Image(np.asarray(tpl.dataobj, np.float32), tpl.affine), fixed)
    if not moving.exists():
        aff = np.diag([voxel, voxel, voxel, 1.0])
        aff[:3, 3] = -voxel * (size - 1) / 2 + np.array([0.0, -18.0, 18.0])
        idx = np.linalg.inv(tpl.affine) @ aff  # moving voxel -> template voxel
        data = ndimage.affine_transform(np.asarray(tpl.dataobj, np.float32), idx[:3, :3],
                                        idx[:3, 3], output_shape=(size,) * 3, order=1)
        nb.save(nb.Nifti1Image(data.astype(np.float32), aff), moving)
    return moving, fixed


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one process."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True,
                          text=True)
    wall = time.monotonic() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024**2


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--voxel", type=float, default=0.5)
    p.add_argument("--modes", nargs="+", default=["affine", "joint"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("-j", "--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    moving, fixed = make_inputs(args.out, args.size, args.voxel)
    exe = [sys.executable, "-m", "synthmorph_nipype.cli.main", "register", "-j",
           str(args.threads)]
    rows = []
    for mode in args.modes:
        configs = {"-t": ["-t", str(args.out / "fwd.h5")],
                   "-t -O": ["-t", str(args.out / "fwd.h5"), "-O", str(args.out / "fo.nii.gz")],
                   "-t -o": ["-t", str(args.out / "fwd.h5"), "-o", str(args.out / "mo.nii.gz")]}
        for name, flags in configs.items():
            runs = [run([*exe, "-m", mode, *flags, str(moving), str(fixed)])
                    for _ in range(args.repeats)]
            rows.append({"mode": mode, "outputs": name,
                         "wall_s": statistics.median(r[0] for r in runs),
                         "peak_gb": statistics.median(r[1] for r in runs)})
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        peer = next(r for r in rows if r["mode"] == row["mode"] and r["outputs"] == "-t")
        row["wall_ratio"] = round(row["wall_s"] / peer["wall_s"], 2)
        row["peak_ratio"] = round(row["peak_gb"] / peer["peak_gb"], 2)
    result = {"size": args.size, "voxel_mm": args.voxel, "threads": args.threads,
              "repeats": args.repeats, "cpu_count": os.cpu_count(), "rows": rows}
    (args.out / "output_memory.json").write_text(json.dumps(result, indent=2))
    print("| mode | outputs | wall s | x -t | peak GB | x -t |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | `{r['outputs']}` | {r['wall_s']:.1f} | {r['wall_ratio']} | "
              f"{r['peak_gb']:.2f} | {r['peak_ratio']} |")


if __name__ == "__main__":
    main()
