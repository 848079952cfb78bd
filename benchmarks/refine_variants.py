"""Quick in-process comparison of refinement settings on ``benchmarks/heldout.py`` pairs.

Where ``benchmarks/accuracy.py`` runs every method as its own process and reads the
results back through SimpleITK, this calls the engine directly (no start-up, no files
written) so that settings can be compared on the held-out pairs in minutes: the affine
error (mm, mean over the fixed brain, against the known motion) of the ``motion-*`` pairs
in affine mode, and the Dice of the 31 brain labels of the ``inter-*`` pairs in joint
mode. Wall times are those of ``register()`` alone.

    python benchmarks/heldout.py --data ../shared/data --out HELDOUT
    python benchmarks/refine_variants.py HELDOUT/pairs --mask --refine-affine 60
    python benchmarks/refine_variants.py HELDOUT/pairs --mask --kind inter --int-steps 4

Choices made with it are confirmed with ``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.metrics import dice, pull_labels  # noqa: E402

from synthmorph_nipype import vocabulary
from synthmorph_nipype.engine import network, refine
from synthmorph_nipype.engine.register import register
from synthmorph_nipype.engine.weights import find_weights, load_models
from synthmorph_nipype.ops import similarity
from synthmorph_nipype.transforms.base import ImageGrid


def affine_error(result, pair: Path) -> float:
    """Mean distance (mm) over the fixed brain between the estimated and true matrices."""
    truth = np.loadtxt(pair / "true_fwd_ras.txt")
    labels = nb.load(pair / "fixed_labels.nii.gz")
    ijk = np.argwhere(np.asarray(labels.dataobj) > 0)[::7]
    pts = np.c_[ijk, np.ones(len(ijk))] @ labels.affine.T
    est = result.forward.transforms[0].matrix
    return float(np.linalg.norm((pts @ (est - truth).T)[:, :3], axis=1).mean())


def label_dice(result, pair: Path) -> float:
    """Mean Dice of the pair's labels: moving labels pulled onto the fixed grid (nearest)
    through the forward transform, as ``benchmarks/accuracy.py`` counts them."""
    labels = json.loads((pair / "pair.json").read_text())["dice_labels"]
    fixed, moving = nb.load(pair / "fixed_labels.nii.gz"), nb.load(pair / "moving_labels.nii.gz")
    world = ImageGrid.from_image(fixed).world_points()
    disp = (result.forward.map(world.reshape(-1, 3)).reshape(world.shape) - world)
    moved = pull_labels(np.asarray(moving.dataobj), moving.affine, disp.astype(np.float32),
                        fixed.affine)
    return dice(moved, np.asarray(fixed.dataobj), labels)["mean"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path, help="the pairs folder of benchmarks/heldout.py")
    parser.add_argument("--kind", choices=("motion", "inter"), default="motion")
    parser.add_argument("--weights", nargs="*", help="weight files (default: embedded)")
    parser.add_argument("--mask", action="store_true", help="pass the fixed brain mask")
    parser.add_argument("--refine", type=int)
    parser.add_argument("--passes", type=int, help="runs of the U-Net as a cascade")
    parser.add_argument("--refine-affine", type=int)
    parser.add_argument("--lam", type=float,
                        help="smoothness weight of the deformable refinement (default: what "
                        "the weights recommend)")
    parser.add_argument("--similarity")
    parser.add_argument("--int-steps", type=int, help="squaring steps inside the refinement")
    parser.add_argument("--warp-features", action="store_true")
    parser.add_argument("--refine-lr", type=float, help="Adam rate of the deformable refinement")
    parser.add_argument("--approx-gradient", action="store_true",
                        help="no backward pass through the integration (exact_gradient=False)")
    parser.add_argument("--points", type=int, help="points per step of the affine refinement")
    parser.add_argument("--affine-pools", type=int, nargs="+",
                        help="pooling of the affine refinement's levels (default 4 2)")
    parser.add_argument("--affine-iterations", type=int, nargs="+",
                        help="steps of each level of the affine refinement")
    parser.add_argument("--anchor", type=int,
                        help="steps between the affine refinement's feature computations")
    parser.add_argument("--fine-share", type=int,
                        help="the 2 mm level runs 1/N of the deformable steps (default 4)")
    parser.add_argument("--fine-lr", type=float, help="Adam rate of the 2 mm level (0.6)")
    parser.add_argument("--mi-weight", type=float, help="weight of MI in mind+mi (0.1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.fine_share is not None:
        vocabulary.FINE_SHARE = args.fine_share
    if args.fine_lr is not None:
        network.FINE_RATE = args.fine_lr
    if args.mi_weight is not None:
        similarity.MIND_MI_WEIGHT = args.mi_weight
    torch.set_num_threads(args.threads)
    if args.int_steps is not None:
        network.REFINE_INT_STEPS = args.int_steps
    extra = {}
    if args.warp_features:
        extra["warp_features"] = True
    if args.approx_gradient:
        extra["exact_gradient"] = False
    if args.refine_lr is not None:
        extra["lr"] = args.refine_lr
    if extra:
        plain = network.refine_svf
        network.refine_svf = lambda *a, **k: plain(*a, **{**k, **extra})
    if args.anchor is not None:
        refine.ANCHOR = args.anchor
    matrix_extra = {}
    if args.points is not None:
        matrix_extra["points"] = args.points
    if args.affine_pools is not None:
        matrix_extra["pools"] = tuple(args.affine_pools)
    if args.affine_iterations is not None:
        matrix_extra["iterations"] = tuple(args.affine_iterations)
    if matrix_extra:
        plain_matrix = network.refine_matrix
        network.refine_matrix = lambda *a, **k: plain_matrix(*a, **{**k, **matrix_extra})
    mode = "affine" if args.kind == "motion" else "joint"
    models = load_models(mode, find_weights(mode, args.weights))
    scores = []
    for pair in sorted(p for p in args.pairs.iterdir() if p.name.startswith(args.kind)):
        mask = nb.load(pair / "fixed_mask.nii.gz") if args.mask else None
        start = time.perf_counter()
        result = register(nb.load(pair / "moving.nii.gz"), nb.load(pair / "fixed.nii.gz"),
                          models, mode=mode, outputs=("forward",), fixed_mask=mask,
                          refine_affine=args.refine_affine, similarity=args.similarity,
                          refine=args.refine if mode == "joint" else None,
                          refine_lambda=args.lam,
                          passes=args.passes if mode == "joint" else None)
        wall = time.perf_counter() - start
        score = affine_error(result, pair) if mode == "affine" else label_dice(result, pair)
        scores.append(score)
        unit = "mm" if mode == "affine" else "Dice"
        print(f"{pair.name:26s} {score:7.3f} {unit}  {wall:6.1f} s", flush=True)
    print(f"mean {np.mean(scores):.3f}")


if __name__ == "__main__":
    main()
