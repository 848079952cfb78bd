"""ANTsPy side of ``benchmarks/accuracy.py``, run with the ANTs venv's Python.

ANTsPy pins its own numpy, so it lives in a separate venv (``benchmarks/setup_peers.sh``)
and the harness never imports it; it calls this script instead:

    python ants_worker.py version
    python ants_worker.py register FIXED MOVING OUTDIR --type SyN|Affine [--threads N] [--quick]
    python ants_worker.py post FIXED MOVING_LABELS OUTDIR [--threads N]

``register`` is what the harness times: ANTs registration, the moved image
(``OUTDIR/moved.nii.gz``) and the forward transforms (``OUTDIR/ants_*``, listed in
antsApplyTransforms order in ``OUTDIR/fwdtransforms.json``). ``post`` composes them into one
ITK displacement field on the fixed grid (``OUTDIR/fwd_comptx.nii.gz``) and warps the moving
labels with nearest-neighbour interpolation (``OUTDIR/labels_tool.nii.gz``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _set_threads(threads: int) -> None:
    # ITK reads this when its first filter is made, so it must precede ``import ants``.
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def register(args: argparse.Namespace) -> None:
    """Register MOVING to FIXED and write the moved image and the forward transforms."""
    import ants

    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    fixed, moving = ants.image_read(args.fixed), ants.image_read(args.moving)
    options: dict = {}
    if args.quick and args.type == "Affine":
        options = {"aff_iterations": (100, 50, 20), "aff_shrink_factors": (4, 2, 1),
                   "aff_smoothing_sigmas": (2, 1, 0)}
    elif args.quick:
        options = {"reg_iterations": (20, 10, 0)}
    result = ants.registration(fixed, moving, type_of_transform=args.type,
                               outprefix=str(out / "ants_"), **options)
    ants.image_write(result["warpedmovout"], str(out / "moved.nii.gz"))
    fwd = [str(Path(p).resolve()) for p in result["fwdtransforms"]]
    (out / "fwdtransforms.json").write_text(json.dumps(fwd, indent=1))


def post(args: argparse.Namespace) -> None:
    """Compose the forward transforms into one field and warp the moving labels."""
    import ants

    out = Path(args.outdir).resolve()
    fwd = json.loads((out / "fwdtransforms.json").read_text())
    fixed, labels = ants.image_read(args.fixed), ants.image_read(args.moving_labels)
    field = ants.apply_transforms(fixed, labels, fwd, compose=str(out / "fwd_"))
    if not field or not Path(field).is_file():
        sys.exit("ants_worker: antsApplyTransforms wrote no composed field")
    warped = ants.apply_transforms(fixed, labels, fwd, interpolator="nearestNeighbor")
    ants.image_write(warped, str(out / "labels_tool.nii.gz"))
    print(json.dumps({"field": str(Path(field).resolve())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version")
    reg = sub.add_parser("register")
    reg.add_argument("fixed")
    reg.add_argument("moving")
    reg.add_argument("outdir")
    reg.add_argument("--type", required=True, choices=("SyN", "Affine"))
    reg.add_argument("--threads", type=int, default=2)
    reg.add_argument("--quick", action="store_true", help="fewer iterations (smoke tests)")
    pst = sub.add_parser("post")
    pst.add_argument("fixed")
    pst.add_argument("moving_labels")
    pst.add_argument("outdir")
    pst.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _set_threads(getattr(args, "threads", 1))
    if args.command == "version":
        import ants

        print(json.dumps({"antspyx": ants.__version__}))
    elif args.command == "register":
        register(args)
    else:
        post(args)


if __name__ == "__main__":
    main()
