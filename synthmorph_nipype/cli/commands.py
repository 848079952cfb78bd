"""What ``synthmorph register`` and ``synthmorph apply`` do, given parsed arguments."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

from ..engine.device import pick_device, set_threads
from ..engine.network import level_steps
from ..engine.register import register as run_register
from ..engine.resample import header_only, resample
from ..engine.weights import find_weights, load_models
from ..errors import DataWarning, InputError, SynthMorphError
from ..io.atomic import OutputSet
from ..io.images import load_image, save_image
from ..transforms.base import ImageGrid, has_shear
from ..transforms.io import load_transform, save_transform, transform_suffix
from ..vocabulary import AFFINE_MODES, DEFORM_MODES

LINEAR_ONLY = (".lta", ".txt", ".mat")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")


def _check_image_output(path: str) -> None:
    if not str(path).lower().endswith(IMAGE_SUFFIXES):
        raise SynthMorphError(f"{path}: unknown image file type (use "
                              f"{', '.join(IMAGE_SUFFIXES)})")


def _check_outputs(args: argparse.Namespace) -> None:
    outputs = [("-o", args.out_moving), ("-O", args.out_fixed),
               ("--out-lambda", args.out_lambda), *(("-t", p) for p in args.trans),
               *(("-T", p) for p in args.inverse)]
    inputs = [("MOVING", args.moving), ("FIXED", args.fixed), ("-i", args.init),
              ("--fixed-mask", args.fixed_mask), ("--moving-mask", args.moving_mask),
              *(("-w", p) for p in args.weights or [])]
    OutputSet.check_distinct(outputs, inputs)
    for _, path in outputs:
        if path:
            OutputSet.check_writable(path)
    for path in (args.out_moving, args.out_fixed, args.out_lambda):
        if path:
            _check_image_output(path)
    for path in (*args.trans, *args.inverse):
        if transform_suffix(path) in LINEAR_ONLY and args.mode not in AFFINE_MODES:
            raise SynthMorphError(f"{path}: this format holds affine transforms only; "
                                  f"write the {args.mode} transform as .h5 or .nii.gz")
    if args.header_only and args.mode not in AFFINE_MODES:
        raise SynthMorphError("-H (header only) needs an affine or rigid mode")
    if args.refine and args.mode in AFFINE_MODES:
        raise SynthMorphError("--refine applies to the deformable modes (joint, deform)")
    if args.refine_affine and args.mode == "deform":
        raise SynthMorphError("--refine-affine applies to the affine, rigid and joint modes")
    if args.passes is not None and args.mode in AFFINE_MODES:
        raise SynthMorphError("--passes applies to the deformable modes (joint, deform)")


def _load_mask(path: str | None):
    """A mask image (non-zero is inside); refused when it is empty."""
    if not path:
        return None
    img = load_image(path, check_values=False)
    if not np.any(np.asanyarray(img.dataobj)):
        raise InputError(f"{path}: the mask is empty (no non-zero voxel)")
    return img


MIN_VOXELS = 1000  # non-zero voxels below which a registration has little to go on
MIN_FOV_MM = 40.0  # a brain registration needs a field of view at least this wide


def _warn_if_little_to_register(path: str, img) -> None:
    """Warn (one line) about images that register to an arbitrary answer: nearly empty,
    or a field of view smaller than a brain's lobe."""
    data = np.asanyarray(img.dataobj)
    nonzero = int(np.count_nonzero(data))
    if nonzero < MIN_VOXELS:
        warnings.warn(f"{path}: only {nonzero} non-zero voxels; the registration has "
                      "little to go on and its answer may be arbitrary", DataWarning,
                      stacklevel=2)
    fov = ImageGrid.from_image(img).zooms * np.array(img.shape[:3])
    if float(fov.min()) < MIN_FOV_MM:
        warnings.warn(f"{path}: field of view {' x '.join(f'{v:g}' for v in fov)} mm is "
                      f"smaller than {MIN_FOV_MM:g} mm along an axis; is this a brain image?",
                      DataWarning, stacklevel=2)


def _header_only(img, chain, command: str):
    moved = header_only(img, chain)
    if has_shear(moved.affine):
        print(f"synthmorph {command}: warning: the moved header has shear, which only the "
              "NIfTI sform holds; ITK-based tools read the qform and will misplace it "
              "(resample instead of -H)", file=sys.stderr)
    return moved


def register(args: argparse.Namespace) -> None:
    """``synthmorph register``."""
    if not any((args.out_moving, args.out_fixed, args.trans, args.inverse,
                args.out_lambda)):
        raise SynthMorphError("nothing to write: give at least one of -o, -O, -t, -T")
    _check_outputs(args)
    set_threads(args.threads)
    device = pick_device(False if args.cpu else True if args.gpu else None)
    moving, fixed = load_image(args.moving), load_image(args.fixed)
    for path, img in ((args.moving, moving), (args.fixed, fixed)):
        _warn_if_little_to_register(path, img)
    moving_mask, fixed_mask = _load_mask(args.moving_mask), _load_mask(args.fixed_mask)
    for path, img in [(p, fixed) for p in args.trans] + [(p, moving) for p in args.inverse]:
        if transform_suffix(path) in (".h5", ".nii", ".nii.gz") and has_shear(
                img.affine) and args.mode not in AFFINE_MODES:
            raise InputError(f"{path}: ITK displacement fields cannot live on the sheared "
                             f"voxel grid of {img.get_filename()}; resample it first")
    init = None
    if args.init:
        init = load_transform(args.init).chain
        if init.as_affine() is None:
            raise InputError(f"{args.init}: the initial transform must be affine")
        lin = init.as_affine().matrix[:3, :3]
        if not np.all(np.isfinite(lin)) or abs(np.linalg.det(lin)) < 1e-6 * max(
                1.0, float(np.abs(lin).max()) ** 3):
            raise InputError(f"{args.init}: the initial transform is singular (not "
                             "invertible)")
    files = find_weights(args.mode, args.weights)
    lam = 0.5 if args.lam is None else args.lam
    models = load_models(args.mode, files, lam=lam)
    spatial = models.deform is not None and models.deform.config.lambda_head
    if args.lam is not None and spatial:
        names = ", ".join(map(str, files))
        effect = ("has no effect (the refinement's weight is the weights' advice, "
                  "--refine-lambda)" if models.refine_lambda is not None
                  else "only weights the test-time refinement")
        print(f"synthmorph register: warning: {names} predicts its own regularisation map; "
              f"-r {effect}", file=sys.stderr)
    if args.out_lambda and not spatial:
        raise SynthMorphError(f"{args.out_lambda}: the {args.mode} model has no spatially "
                              "varying regularisation (no lambda map to write)")
    if args.fixed_mask or args.moving_mask:
        steps = []  # the refinements this mode runs: the masks act on nothing else
        if args.mode != "deform":
            steps.append(models.refine_affine if args.refine_affine is None
                         else args.refine_affine)
        if args.mode in DEFORM_MODES:
            steps.append(models.refine if args.refine is None else args.refine)
        if not any(steps):  # (workflows pass masks whatever the weights recommend)
            warnings.warn("the masks have no effect: they restrict the test-time "
                          "refinement, which is off here (give --refine-affine / --refine "
                          "N)", DataWarning, stacklevel=2)
    start = time.perf_counter()
    outputs = tuple(name for name, wanted in (("forward", args.trans or args.out_moving),
                                              ("inverse", args.inverse or args.out_fixed))
                    if wanted)
    result = run_register(moving, fixed, models, mode=args.mode, extent=args.extent,
                          steps=args.steps, init=init, device=device, outputs=outputs,
                          refine=args.refine, lam=lam, refine_lambda=args.refine_lambda,
                          similarity=args.refine_similarity,
                          refine_affine=args.refine_affine, moving_mask=moving_mask,
                          fixed_mask=fixed_mask, passes=args.passes)
    elapsed = time.perf_counter() - start
    with OutputSet() as out:
        for path in args.trans:
            save_transform(out.temp(path), result.forward, source=result.moving,
                           reference=result.fixed)
        for path in args.inverse:
            save_transform(out.temp(path), result.inverse, source=result.fixed,
                           reference=result.moving)
        for path, img, chain, grid in ((args.out_moving, moving, result.forward, result.fixed),
                                       (args.out_fixed, fixed, result.inverse, result.moving)):
            if path:
                moved = _header_only(img, chain, "register") if args.header_only else resample(
                    img, chain, grid)
                save_image(moved, out.temp(path))
        if args.out_lambda:
            save_image(result.lambda_map, out.temp(args.out_lambda))
    print(f"synthmorph register: {args.mode} registration done in {elapsed:.1f} s on {device}")
    if "passes" in result.info:
        print(f"synthmorph register: the deformable network ran in {result.info['passes']} "
              "passes (a cascade)")
    if "refine_affine_loss" in result.info:
        losses = result.info["refine_affine_loss"]
        coarse = level_steps(result.info["refine_affine"])[0]
        levels = ((f"{coarse} at 4 mm", losses[:coarse]), (f"{len(losses) - coarse} at 2 mm",
                                                            losses[coarse:]))
        print("synthmorph register: affine refinement (mind) loss " + ", ".join(
            f"{part[0]:.4f} -> {part[-1]:.4f} in {name}" for name, part in levels if part))
    if "refine_loss" in result.info:
        levels = ((f"{result.info['refine']} steps at 4 mm", result.info["refine_loss"]),
                  (f"{len(result.info['refine_fine_loss'])} at 2 mm",
                   result.info["refine_fine_loss"]))
        print(f"synthmorph register: refinement ({result.info['refine_similarity']}) loss "
              + ", ".join(f"{part[0]:.4f} -> {part[-1]:.4f} in {name}"
                          for name, part in levels if part)
              + f" (lambda {result.info['refine_lambda']:g})")


def apply(args: argparse.Namespace) -> None:
    """``synthmorph apply``."""
    pairs = list(zip(args.pairs[::2], args.pairs[1::2], strict=True))
    OutputSet.check_distinct(
        [(f"OUTPUT {n}", output) for n, (_, output) in enumerate(pairs, start=1)],
        [("TRANSFORM", args.transform), ("--reference", args.reference),
         *((f"INPUT {n}", inp) for n, (inp, _) in enumerate(pairs, start=1))])
    for _, output in pairs:
        OutputSet.check_writable(output)
        _check_image_output(output)
    loaded = load_transform(args.transform)
    if args.reference:
        reference = ImageGrid.from_image(load_image(args.reference, check_values=False))
    elif loaded.reference is not None:
        reference = loaded.reference
    elif not args.header_only:
        raise InputError(f"{args.transform}: holds no output grid; give one with --reference")
    with OutputSet() as out:
        for inp, output in pairs:
            img = load_image(inp, check_values=False)
            if args.header_only:
                moved = _header_only(img, loaded.chain, "apply")
            else:
                moved = resample(img, loaded.chain, reference, method=args.method,
                                 fill=args.fill, dtype=args.dtype)
            save_image(moved, out.temp(output))
