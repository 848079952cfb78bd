"""The registration methods compared: SynthMorph, ANTsPy, elastix."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/, which holds ants_worker.py


@dataclass
class Context:
    """Settings shared by all methods."""

    threads: int
    quick: bool
    extent: int
    weights: dict[str, list[str]]
    ants_python: Path
    work: Path
    gpu: bool = False

    def env(self) -> dict[str, str]:
        """The environment of every method process (thread counts pinned)."""
        n = str(self.threads)
        return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n,
                    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=n)


class Method:
    """A registration method: availability, the timed command, the untimed follow-up."""

    name = ""
    kind = ""  # "affine" or "deformable"

    def check(self, ctx: Context) -> str | None:
        """Why the method cannot run here (None if it can)."""
        return None

    def version(self, ctx: Context) -> str:
        """A version string for the report."""
        return ""

    def command(self, pair: Path, run: Path, ctx: Context) -> list[str]:
        """The registration command (timed)."""
        raise NotImplementedError

    def post(self, pair: Path, run: Path, ctx: Context, log) -> tuple[list[Path], Path]:
        """Untimed: (forward transform files for ``displacement_on_grid``, labels warped
        by the tool itself)."""
        raise NotImplementedError


def _call(cmd: Sequence[str], ctx: Context, log) -> None:
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    subprocess.run([str(c) for c in cmd], env=ctx.env(), stdout=log, stderr=subprocess.STDOUT,
                   check=True)


class SynthMorph(Method):
    """``synthmorph register`` (this package), run as its own process."""

    def __init__(self, mode: str, suffix: str = "", extra: Sequence[str] = (),
                 weights: str | None = None, mask: bool = False):
        self.mode, self.name = mode, f"synthmorph-{mode}{suffix}"
        self.mask = mask  # pass the pair's fixed_mask.nii.gz as -x
        self.kind = "affine" if mode in ("affine", "rigid") else "deformable"
        self.extra = list(extra)
        self.weights_key = weights or mode  # which --weights-* option gives its weights

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "synthmorph_nipype.cli.main"]

    def check(self, ctx: Context) -> str | None:
        given = ctx.weights.get(self.weights_key)
        if self.weights_key != self.mode and not given:
            return f"give its weights with --weights-{self.weights_key.replace('_', '-')}"
        if given:
            missing = [w for w in given if not Path(w).is_file()]
            return f"weights not found: {', '.join(missing)}" if missing else None
        try:
            from synthmorph_nipype.engine.weights import find_weights
            from synthmorph_nipype.errors import WeightsError
        except ImportError as err:
            return f"synthmorph_nipype not importable: {err}"
        try:
            find_weights(self.mode)
        except WeightsError as err:
            return f"no weights (give --weights-{self.mode}): {err}"
        return None

    def version(self, ctx: Context) -> str:
        import synthmorph_nipype

        return synthmorph_nipype.__version__

    def command(self, pair: Path, run: Path, ctx: Context) -> list[str]:
        cmd = self._cli() + ["register", str(pair / "moving.nii.gz"), str(pair / "fixed.nii.gz"),
                             "-m", self.mode, "-t", str(run / "fwd.h5"),
                             "-o", str(run / "moved.nii.gz"), "-j", str(ctx.threads),
                             "-e", str(ctx.extent), "-g" if ctx.gpu else "--cpu"]
        for w in ctx.weights.get(self.weights_key) or []:
            cmd += ["-w", str(w)]
        if self.mask and (pair / "fixed_mask.nii.gz").is_file():
            cmd += ["-x", str(pair / "fixed_mask.nii.gz")]
        return cmd + self.extra

    def post(self, pair: Path, run: Path, ctx: Context, log) -> tuple[list[Path], Path]:
        _call(self._cli() + ["apply", "-m", "nearest", run / "fwd.h5",
                             pair / "moving_labels.nii.gz", run / "labels_tool.nii.gz",
                             "--reference", pair / "fixed.nii.gz"], ctx, log)
        return [run / "fwd.h5"], run / "labels_tool.nii.gz"


class Ants(Method):
    """ANTsPy ``registration`` in its own venv via ``ants_worker.py``."""

    worker = HERE / "ants_worker.py"

    def __init__(self, kind: str):
        self.type = kind
        self.name = "ants-syn" if kind == "SyN" else "ants-affine"
        self.kind = "deformable" if kind == "SyN" else "affine"
        self._version: str | None = None

    def check(self, ctx: Context) -> str | None:
        if not ctx.ants_python.is_file():
            return (f"no ANTs venv python at {ctx.ants_python} (run benchmarks/setup_peers.sh "
                    "or give --ants-python)")
        try:
            out = subprocess.run([str(ctx.ants_python), str(self.worker), "version"],
                                 capture_output=True, text=True, check=True, timeout=300)
            self._version = json.loads(out.stdout.strip().splitlines()[-1])["antspyx"]
        except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as err:
            return f"ANTsPy not usable with {ctx.ants_python}: {err}"
        return None

    def version(self, ctx: Context) -> str:
        return f"antspyx {self._version}"

    def command(self, pair: Path, run: Path, ctx: Context) -> list[str]:
        cmd = [str(ctx.ants_python), str(self.worker), "register", str(pair / "fixed.nii.gz"),
               str(pair / "moving.nii.gz"), str(run), "--type", self.type,
               "--threads", str(ctx.threads)]
        return cmd + (["--quick"] if ctx.quick else [])

    def post(self, pair: Path, run: Path, ctx: Context, log) -> tuple[list[Path], Path]:
        _call([ctx.ants_python, self.worker, "post", pair / "fixed.nii.gz",
               pair / "moving_labels.nii.gz", run, "--threads", ctx.threads], ctx, log)
        return [run / "fwd_comptx.nii.gz"], run / "labels_tool.nii.gz"


def elastix_parameters(transform: str, quick: bool, last: bool) -> str:
    """An elastix parameter file: multi-resolution, Mattes MI (any contrast), adaptive
    stochastic gradient descent; ``transform`` is "affine" or "bspline"."""
    p: dict[str, object] = {
        "FixedInternalImagePixelType": "float", "MovingInternalImagePixelType": "float",
        "UseDirectionCosines": "true", "Registration": "MultiResolutionRegistration",
        "FixedImagePyramid": "FixedSmoothingImagePyramid",
        "MovingImagePyramid": "MovingSmoothingImagePyramid",
        "Interpolator": "BSplineInterpolator", "BSplineInterpolationOrder": 1,
        "ResampleInterpolator": "FinalBSplineInterpolator", "FinalBSplineInterpolationOrder": 3,
        "Resampler": "DefaultResampler", "Optimizer": "AdaptiveStochasticGradientDescent",
        "Metric": "AdvancedMattesMutualInformation", "NumberOfHistogramBins": 32,
        "ImageSampler": "RandomCoordinate", "NumberOfSpatialSamples": 2048,
        "NewSamplesEveryIteration": "true", "CheckNumberOfSamples": "true",
        "NumberOfResolutions": 2 if quick else 4,
        "MaximumNumberOfIterations": 100 if quick else 500,
        "HowToCombineTransforms": "Compose", "DefaultPixelValue": 0,
        "WriteResultImage": "true" if last else "false", "ResultImagePixelType": "float",
        "ResultImageFormat": "nii.gz",
    }
    if transform == "affine":
        p.update({"Transform": "AffineTransform", "AutomaticScalesEstimation": "true",
                  "AutomaticTransformInitialization": "true",
                  "AutomaticTransformInitializationMethod": "CenterOfGravity"})
    else:
        p.update({"Transform": "BSplineTransform",
                  "FinalGridSpacingInPhysicalUnits": 20 if quick else 10})
    lines = []
    for key, value in p.items():
        text = f'"{value}"' if isinstance(value, str) else str(value)
        lines.append(f"({key} {text})")
    return "\n".join(lines) + "\n"


class Elastix(Method):
    """The elastix binary: affine, then (unless ``affine_only``) B-spline."""

    def __init__(self, affine_only: bool):
        self.stages = ["affine"] if affine_only else ["affine", "bspline"]
        self.name = "elastix-affine" if affine_only else "elastix"
        self.kind = "affine" if affine_only else "deformable"

    def check(self, ctx: Context) -> str | None:
        missing = [b for b in ("elastix", "transformix") if shutil.which(b) is None]
        if missing:
            return f"{' and '.join(missing)} not on PATH (run benchmarks/setup_peers.sh)"
        return None

    def version(self, ctx: Context) -> str:
        out = subprocess.run(["elastix", "--version"], capture_output=True, text=True)
        return out.stdout.strip()

    def command(self, pair: Path, run: Path, ctx: Context) -> list[str]:
        run.mkdir(parents=True, exist_ok=True)
        cmd = ["elastix", "-f", str(pair / "fixed.nii.gz"), "-m", str(pair / "moving.nii.gz"),
               "-out", str(run), "-threads", str(ctx.threads)]
        for i, stage in enumerate(self.stages):
            params = run / f"params_{stage}.txt"
            params.write_text(elastix_parameters(stage, ctx.quick, i == len(self.stages) - 1))
            cmd += ["-p", str(params)]
        return cmd

    def post(self, pair: Path, run: Path, ctx: Context, log) -> tuple[list[Path], Path]:
        tp = run / f"TransformParameters.{len(self.stages) - 1}.txt"
        _call(["transformix", "-def", "all", "-tp", tp, "-out", run, "-threads", ctx.threads],
              ctx, log)
        text = tp.read_text()
        text = re.sub(r"\(FinalBSplineInterpolationOrder \d+\)",
                      "(FinalBSplineInterpolationOrder 0)", text)
        text = re.sub(r'\(ResultImagePixelType "[^"]*"\)',
                      '(ResultImagePixelType "unsigned char")', text)
        nearest = run / "TransformParameters.nearest.txt"
        nearest.write_text(text)
        labels_dir = run / "labels"
        labels_dir.mkdir(exist_ok=True)
        _call(["transformix", "-in", pair / "moving_labels.nii.gz", "-tp", nearest,
               "-out", labels_dir, "-threads", ctx.threads], ctx, log)
        fields = sorted(run.glob("deformationField.*"))
        if not fields:
            raise RuntimeError("transformix wrote no deformationField")
        results = sorted(labels_dir.glob("result.*"))
        return [fields[0]], results[0] if results else run / "missing"


NO_REFINEMENT = ["--refine", "0", "--refine-affine", "0"]
METHODS: dict[str, Callable[[], Method]] = {
    # the defaults (with the test-time refinement the weights recommend), the networks
    # alone, and longer refinements
    "synthmorph-joint": lambda: SynthMorph("joint"),
    "synthmorph-affine": lambda: SynthMorph("affine"),
    "synthmorph-joint-net": lambda: SynthMorph("joint", "-net", NO_REFINEMENT),
    "synthmorph-affine-net": lambda: SynthMorph("affine", "-net", ["--refine-affine", "0"]),
    # the refinements restricted to the fixed image's brain mask (pairs that have one)
    "synthmorph-affine-mask": lambda: SynthMorph("affine", "-mask", mask=True),
    "synthmorph-joint-mask": lambda: SynthMorph("joint", "-mask", mask=True),
    "synthmorph-joint-refine50": lambda: SynthMorph("joint", "-refine50", ["--refine", "50"]),
    "synthmorph-joint-refine200": lambda: SynthMorph("joint", "-refine200", ["--refine", "200"]),
    # other joint models (give them with --weights-finetuned / --weights-svr), with the
    # refinement they recommend and alone
    "synthmorph-joint-finetuned": lambda: SynthMorph("joint", "-finetuned", weights="finetuned"),
    "synthmorph-joint-finetuned-net": lambda: SynthMorph("joint", "-finetuned-net", NO_REFINEMENT,
                                                         weights="finetuned"),
    "synthmorph-joint-svr": lambda: SynthMorph("joint", "-svr", weights="svr"),
    "synthmorph-joint-svr-net": lambda: SynthMorph("joint", "-svr-net", NO_REFINEMENT,
                                                   weights="svr"),
    "ants-syn": lambda: Ants("SyN"),
    "ants-affine": lambda: Ants("Affine"),
    "elastix": lambda: Elastix(affine_only=False),
    "elastix-affine": lambda: Elastix(affine_only=True),
}


DEFAULT_METHODS = ["synthmorph-joint", "synthmorph-affine", "ants-syn", "ants-affine",
                   "elastix", "elastix-affine"]
