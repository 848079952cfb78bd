"""Nipype interfaces to ``synthmorph register`` and ``synthmorph apply``.

Why command-line wrappers and not in-process ``SimpleInterface``\\ s:

* **Process isolation.** PyTorch keeps its thread pools, allocator caches and (on a GPU)
  a CUDA context for the life of the process. Run in a MultiProc worker, that state
  would outlive the node, and a forked worker that inherits an initialised OpenMP pool
  can hang. A child process per node frees everything when it exits and gets exactly
  the ``-j`` threads the scheduler granted.
* **Provenance.** Nipype records the exact command line of each node; anyone can rerun
  it in a shell, with the flags of FreeSurfer's ``mri_synthmorph``.
* **Clusters.** The batch plugins (SLURM, SGE, PBS) run a node with the same Python on
  another host; a command line needs nothing else from the submitting process.

The price is the start-up of a Python process with torch (about one to two seconds per
node), small next to a registration.

``use_gpu`` and ``num_threads`` are ``nohash=True``: MultiProc counts GPU slots from
``use_gpu`` and sets ``num_threads`` from the node's ``n_procs``, and a cached result
stays valid when a pipeline moves between a GPU host and a CPU host. A GPU node runs on
CUDA where the host has it and on the CPU elsewhere, so one workflow serves both; a CPU
node (``use_gpu=False``) never touches the GPU. On a host without GPUs, MultiProc needs
``plugin_args={"n_gpu_procs": 1}`` (GPU nodes then run one at a time) or
``{"raise_insufficient": False}`` to accept GPU nodes at all.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from nipype.interfaces.base import (
    CommandLine,
    CommandLineInputSpec,
    File,
    InputMultiObject,
    TraitedSpec,
    traits,
)

from ..vocabulary import AFFINE_MODES, EXTENTS, IMAGE_SIMILARITIES, MODES, check

#: Peak resident memory (GB) of one registration measured on 2 CPU threads, for the
#: embedded (small) models and for models of the official size, by extent. The embedded
#: figures include the test-time refinement they recommend (1 mm benchmark pairs).
_MEASURED_GB = {
    ("embedded", "affine", 256): 3.0, ("embedded", "joint", 256): 3.1,
    ("embedded", "affine", 192): 2.1, ("embedded", "joint", 192): 2.4,
    ("official", "affine", 256): 3.0, ("official", "joint", 256): 10.8,
    ("official", "affine", 192): 2.0, ("official", "joint", 192): 4.9,
}


def estimate_mem_gb(mode: str = "joint", extent: int = 256, *, official: bool = False) -> float:
    """Peak memory (GB) to reserve for one registration node, for Nipype's ``mem_gb``.

    Figures measured on the CPU with a 1 mm head pair (``benchmarks/``), rounded up by a
    quarter for images larger than the template; models of the official size (``-w``)
    need far more than the embedded ones.

    >>> estimate_mem_gb("joint", 256)
    4.0
    >>> estimate_mem_gb("rigid", 192, official=True)
    2.5
    """
    check("extent", extent, EXTENTS)
    kind = "affine" if mode in AFFINE_MODES else "joint"
    gb = _MEASURED_GB[("official" if official else "embedded", kind, extent)]
    return round(gb * 1.25 * 4) / 4


def synthmorph_command() -> str:
    """The ``synthmorph`` program of the running Python (its console script when
    installed beside the interpreter, else the module), so worker processes and cluster
    jobs run the same installation as the pipeline that built them."""
    script = Path(sys.executable).parent / "synthmorph"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return f"{sys.executable} -m synthmorph_nipype.cli.main"


_DONE = re.compile(r"registration done in ([0-9.]+) s on (\S+)")


class _SynthMorphInputSpec(CommandLineInputSpec):
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="CPU threads (-j)")


class SynthMorphRegisterInputSpec(_SynthMorphInputSpec):
    moving_image = File(exists=True, mandatory=True, position=-2, argstr="%s",
                        desc="image to register (MOVING)")
    fixed_image = File(exists=True, mandatory=True, position=-1, argstr="%s",
                       desc="reference image (FIXED)")
    mode = traits.Enum(*MODES, usedefault=True, argstr="-m %s",
                       desc="transformation model; deform starts from init_transform")
    regularization = traits.Range(low=0.0, high=1.0, value=0.5, exclude_low=True,
                                  exclude_high=True, usedefault=True, argstr="-r %g",
                                  desc="regularization weight lambda (deformable modes)")
    extent = traits.Enum(256, 192, usedefault=True, argstr="-e %d",
                         desc="isotropic network extent in voxels")
    steps = traits.Range(low=0, value=7, usedefault=True, argstr="-n %d",
                         desc="integration steps of the velocity field")
    init_transform = File(exists=True, argstr="-i %s",
                          desc="initial affine (ITK .txt/.mat/.h5 or LTA), MOVING to FIXED")
    fixed_mask = traits.Either(None, File(exists=True), argstr="-x %s",
                               desc="the test-time refinements count the similarity only "
                               "inside this mask of FIXED (as ANTs' -x), e.g. a template's "
                               "brain mask (None: no mask)")
    moving_mask = traits.Either(None, File(exists=True), argstr="--moving-mask %s",
                                desc="the same for MOVING (the networks still see the whole "
                                "image)")
    weights = InputMultiObject(File(exists=True), argstr="-w %s...",
                               desc="model weights (.pt or FreeSurfer .h5); default: the "
                               "installed/embedded models")
    passes = traits.Range(low=1, argstr="--passes %d",
                          desc="runs of the deformable network as a cascade (unset: what "
                          "the weights recommend)")
    refine = traits.Range(low=0, argstr="--refine %d",
                          desc="test-time refinement steps of the deformable field")
    refine_similarity = traits.Enum(*IMAGE_SIMILARITIES, argstr="--refine-similarity %s",
                                    desc="image similarity of the refinement")
    refine_lambda = traits.Range(low=0.0, high=1.0, exclude_low=True, exclude_high=True,
                                 argstr="--refine-lambda %g",
                                 desc="smoothness weight of the deformable refinement "
                                 "(unset: what the weights recommend, else regularization)")
    refine_affine = traits.Range(low=0, argstr="--refine-affine %d",
                                 desc="test-time refinement steps of the affine (unset: "
                                 "what the weights recommend)")
    write_moved = traits.Bool(True, usedefault=True, desc="write MOVING resampled on FIXED")
    write_lambda = traits.Bool(False, usedefault=True,
                               desc="write the voxel-wise regularisation weight of a model "
                               "with spatially varying regularisation (on FIXED's grid)")
    write_inverse_moved = traits.Bool(False, usedefault=True,
                                      desc="write FIXED resampled on MOVING")
    use_gpu = traits.Bool(False, usedefault=True, nohash=True,
                          desc="a GPU node: run on CUDA when the host has it (else on the "
                          "CPU); False pins the CPU (--cpu)")


class SynthMorphRegisterOutputSpec(TraitedSpec):
    forward_transform = File(exists=True, desc="MOVING to FIXED, ITK (.h5 composite for "
                             "deformable modes, .txt for affine ones)")
    inverse_transform = File(exists=True, desc="FIXED to MOVING, ITK")
    forward_lta = File(desc="MOVING to FIXED as FreeSurfer LTA (affine modes only)")
    inverse_lta = File(desc="FIXED to MOVING as FreeSurfer LTA (affine modes only)")
    moved_image = File(desc="MOVING resampled onto FIXED")
    inverse_moved_image = File(desc="FIXED resampled onto MOVING")
    lambda_map = File(desc="voxel-wise regularisation weight on FIXED's grid (write_lambda)")
    elapsed_s = traits.Float(desc="registration time reported by synthmorph (no start-up, "
                             "no I/O)")
    device = traits.Str(desc="where the networks ran (cpu, cuda)")


class SynthMorphRegister(CommandLine):
    """Register one image to another with SynthMorph (``synthmorph register``).

    >>> reg = SynthMorphRegister(moving_image="sub-01_T1w.nii.gz",
    ...                          fixed_image="tpl-T1w.nii.gz", mode="affine", num_threads=2)
    >>> reg.cmdline.split(" ", 1)[1]  # doctest: +NORMALIZE_WHITESPACE
    'register -e 256 -m affine -r 0.5 -n 7 -j 2 --cpu -t fwd_xfm.txt -t fwd_xfm.lta
     -T inv_xfm.txt -T inv_xfm.lta -o moved.nii.gz sub-01_T1w.nii.gz tpl-T1w.nii.gz'
    """

    input_spec = SynthMorphRegisterInputSpec
    output_spec = SynthMorphRegisterOutputSpec
    _cmd = "synthmorph"

    def __init__(self, **inputs):
        super().__init__(command=f"{synthmorph_command()} register", **inputs)

    def _outputs_named(self) -> dict[str, str]:
        cwd = Path(os.getcwd())
        affine = self.inputs.mode in AFFINE_MODES
        ext = ".txt" if affine else ".h5"
        names = {"forward_transform": f"fwd_xfm{ext}", "inverse_transform": f"inv_xfm{ext}"}
        if affine:
            names.update(forward_lta="fwd_xfm.lta", inverse_lta="inv_xfm.lta")
        if self.inputs.write_moved:
            names["moved_image"] = "moved.nii.gz"
        if self.inputs.write_inverse_moved:
            names["inverse_moved_image"] = "inverse_moved.nii.gz"
        if self.inputs.write_lambda:
            names["lambda_map"] = "lambda_map.nii.gz"
        return {k: str(cwd / v) for k, v in names.items()}

    def _format_arg(self, name, spec, value):
        if name in ("fixed_mask", "moving_mask") and value is None:
            return None  # a template without a mask: no flag
        return super()._format_arg(name, spec, value)

    def _parse_inputs(self, skip=None):
        args = super()._parse_inputs(skip=skip)  # ends with MOVING FIXED (positions -2, -1)
        out = {k: os.path.basename(v) for k, v in self._outputs_named().items()}
        extra = [f"-j {self.inputs.num_threads}"] + ([] if self.inputs.use_gpu else ["--cpu"])
        for flag, keys in (("-t", ("forward_transform", "forward_lta")),
                           ("-T", ("inverse_transform", "inverse_lta"))):
            extra += [f"{flag} {out[k]}" for k in keys if k in out]
        if "moved_image" in out:
            extra.append(f"-o {out['moved_image']}")
        if "inverse_moved_image" in out:
            extra.append(f"-O {out['inverse_moved_image']}")
        if "lambda_map" in out:
            extra.append(f"--out-lambda {out['lambda_map']}")
        return args[:-2] + extra + args[-2:]

    def _run_interface(self, runtime, correct_return_codes=(0,)):
        runtime = super()._run_interface(runtime, correct_return_codes)
        found = _DONE.search(runtime.stdout or "")
        self._report = (float(found.group(1)), found.group(2)) if found else None
        return runtime

    def _list_outputs(self):
        out = self._outputs_named()
        report = getattr(self, "_report", None)
        if report:
            out["elapsed_s"], out["device"] = report
        return out


class SynthMorphApplyInputSpec(CommandLineInputSpec):
    transform = File(exists=True, mandatory=True, position=0, argstr="%s",
                     desc="transform written by SynthMorphRegister (any of its formats)")
    input_image = File(exists=True, mandatory=True, position=1, argstr="%s",
                       desc="image to resample")
    output_image = File(position=2, argstr="%s", name_source=["input_image"],
                        name_template="%s_moved", keep_extension=True, hash_files=False,
                        desc="output file name (default: <input>_moved)")
    reference_image = File(exists=True, argstr="--reference %s",
                           desc="output grid (default: the grid the transform names)")
    interpolation = traits.Enum("linear", "nearest", usedefault=True, argstr="-m %s",
                                desc="nearest keeps label values")
    dtype = traits.Enum("uint8", "uint16", "int16", "int32", "float32", "float64",
                        argstr="-t %s", desc="output data type (default: the input's)")
    fill = traits.Float(0.0, usedefault=True, argstr="-f %g", desc="value outside the input")


class SynthMorphApplyOutputSpec(TraitedSpec):
    output_image = File(exists=True, desc="resampled image")


class SynthMorphApply(CommandLine):
    """Resample an image through a SynthMorph transform (``synthmorph apply``).

    >>> app = SynthMorphApply(transform="fwd_xfm.h5", input_image="sub-01_T1w.nii.gz",
    ...                       reference_image="tpl-T1w.nii.gz", interpolation="nearest")
    >>> app.cmdline.split(" ", 1)[1]  # doctest: +NORMALIZE_WHITESPACE
    'apply fwd_xfm.h5 sub-01_T1w.nii.gz sub-01_T1w_moved.nii.gz -f 0 -m nearest
     --reference tpl-T1w.nii.gz'
    """

    input_spec = SynthMorphApplyInputSpec
    output_spec = SynthMorphApplyOutputSpec
    _cmd = "synthmorph"

    def __init__(self, **inputs):
        super().__init__(command=f"{synthmorph_command()} apply", **inputs)
