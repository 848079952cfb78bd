"""Find and load model weights for a registration mode.

Order of precedence: files given with ``-w``; the official FreeSurfer files under
``$FREESURFER_HOME/models``; the default models in ``$SYNTHMORPH_WEIGHTS_DIR`` when that is
set (a site-wide default), else the package's embedded ones.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import WeightsError
from ..models.affine import AffineDetector
from ..models.checkpoint import load_checkpoint
from ..models.joint import HyperUNet, UNet
from ..models.keras import load_keras
from ..vocabulary import DEFORM_MODES, DETECTOR_MODES

OFFICIAL = {
    "affine": ("synthmorph.affine.2.h5",),
    "rigid": ("synthmorph.rigid.1.h5",),
    "deform": ("synthmorph.deform.3.h5",),
    "joint": ("synthmorph.affine.2.h5", "synthmorph.deform.3.h5"),
}
# default files per mode, first found wins (the affine detector also serves as rigid one)
EMBEDDED = {"affine": ("synthmorph_nipype.affine.pt",),
            "rigid": ("synthmorph_nipype.rigid.pt", "synthmorph_nipype.affine.pt"),
            "deform": ("synthmorph_nipype.joint.pt",), "joint": ("synthmorph_nipype.joint.pt",)}


@dataclass
class Models:
    """The networks a mode needs: a feature detector and/or a deformable U-Net."""

    affine: AffineDetector | None = None
    deform: UNet | None = None
    sources: tuple[str, ...] = ()
    # test-time refinement steps the weights recommend for the affine and the deformable
    # step (their checkpoint's ``refine_affine`` / ``refine`` metadata; FreeSurfer's: none)
    refine_affine: int = 0
    refine: int = 0
    refine_similarity: str = "ncc"
    # the smoothness weight of the deformable refinement (``refine_lambda`` metadata;
    # None: the registration's regularisation weight)
    refine_lambda: float | None = None
    # runs of the U-Net as a cascade (``passes`` metadata; FreeSurfer's: one, as trained),
    # and when its field is then refined (``refine_passes``; without it: ``passes``)
    passes: int = 1
    refine_passes: int = 1

    def cascade(self, refine: int) -> int:
        """The passes the weights recommend for a run with ``refine`` refinement steps."""
        return self.refine_passes if refine > 0 else self.passes

    def refine_weight(self, lam: float) -> float:
        """The refinement's smoothness weight: the weights' advice, else ``lam``."""
        return lam if self.refine_lambda is None else self.refine_lambda

    def to(self, device) -> Models:
        for m in (self.affine, self.deform):
            if m is not None:
                m.to(device)
        return self


def needs(mode: str) -> tuple[bool, bool]:
    """Whether ``mode`` needs (a feature detector, a deformable network)."""
    return mode in DETECTOR_MODES, mode in DEFORM_MODES


def find_weights(mode: str, weights: list[str] | None = None) -> list[Path]:
    """Weight files for ``mode``: ``weights`` if given, else FreeSurfer's, else embedded."""
    if weights:
        return [Path(w) for w in weights]
    fs_home = os.environ.get("FREESURFER_HOME")
    if fs_home:
        files = [Path(fs_home) / "models" / name for name in OFFICIAL[mode]]
        if all(f.is_file() for f in files):
            return files
    site = os.environ.get("SYNTHMORPH_WEIGHTS_DIR")
    folder = Path(site) if site else Path(str(resources.files("synthmorph_nipype") / "data"))
    for name in EMBEDDED[mode]:
        if (folder / name).is_file():
            return [folder / name]
    raise WeightsError(
        f"no SynthMorph weights installed for mode '{mode}': pass them with -w FILE "
        f"(e.g. {' -w '.join(OFFICIAL[mode])} from FreeSurfer), set FREESURFER_HOME "
        "to a FreeSurfer installation that has them in models/, or SYNTHMORPH_WEIGHTS_DIR "
        "to a folder of them")


def load_parts(path: str | Path, *, lam: float | None = None, rigid: bool = False,
               want_affine: bool = True, want_deform: bool = True
               ) -> tuple[AffineDetector | None, UNet | HyperUNet | None, dict]:
    """The feature detector, deformable network and metadata of one weights file, our
    ``.pt`` or FreeSurfer's Keras ``.h5`` (no metadata). ``lam``: specialise a hyper U-Net
    for that regularisation weight (None: keep the hypernetwork)."""
    if str(path).endswith((".pt", ".pth")):
        parts = load_checkpoint(path)
        deform = parts["deform"]
        if lam is not None and isinstance(deform, HyperUNet) and want_deform:
            deform = deform.specialize(lam)
        return parts["affine"], deform, parts["meta"]
    keras = load_keras(path, rigid=rigid, lam=lam, want_affine=want_affine,
                       want_deform=want_deform)
    return keras.affine, keras.deform, {}


def load_models(mode: str, files: list[Path], *, lam: float = 0.5) -> Models:
    """Load the parts ``mode`` needs from Keras ``.h5`` or torch ``.pt`` files."""
    want_affine, want_deform = needs(mode)
    rigid = mode == "rigid"
    affine = deform = None
    refine_affine = refine = 0
    similarity = "ncc"
    refine_lambda = None
    passes = refine_passes = 1
    for path in files:
        if not Path(path).is_file():
            raise WeightsError(f"{path}: weights file not found")
        if not want_affine and not want_deform:
            continue
        found_affine, found_deform, meta = load_parts(
            path, lam=lam, rigid=rigid, want_affine=want_affine, want_deform=want_deform)
        if found_affine is not None and want_affine and affine is None:
            refine_affine = int(meta.get("refine_affine", 0))
        if found_deform is not None and want_deform and deform is None:
            refine = int(meta.get("refine", 0))
            similarity = str(meta.get("refine_similarity", "ncc"))
            passes = int(meta.get("passes", 1))
            refine_passes = int(meta.get("refine_passes", passes))
            for key, value in (("passes", passes), ("refine_passes", refine_passes)):
                if value < 1:
                    raise WeightsError(f"{path}: its {key} {value} is below 1; set another "
                                       f"with scripts/recommend.py --{key.replace('_', '-')}")
            if "refine_lambda" in meta:
                refine_lambda = float(meta["refine_lambda"])
                if not 0 <= refine_lambda < 1:
                    raise WeightsError(f"{path}: its refine_lambda {refine_lambda} lies "
                                       "outside [0, 1); set another with "
                                       "scripts/recommend.py --refine-lambda")
        affine = affine or (found_affine if want_affine else None)
        deform = deform or (found_deform if want_deform else None)
    names = ", ".join(str(f) for f in files)
    if want_affine and affine is None:
        raise WeightsError(f"{names}: no affine feature detector in these weights, "
                           f"mode '{mode}' needs one")
    if want_deform and deform is None:
        raise WeightsError(f"{names}: no deformable network in these weights, "
                           f"mode '{mode}' needs one")
    if affine is not None and affine.config.rigid != rigid:
        affine.config = dataclasses.replace(affine.config, rigid=rigid)
    return Models(affine, deform, tuple(str(f) for f in files), refine_affine, refine,
                  similarity, refine_lambda, passes, refine_passes)
