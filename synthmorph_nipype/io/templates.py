"""Registration templates available offline: the ICBM 2009a template nilearn ships,
TemplateFlow templates already in ``$TEMPLATEFLOW_HOME``, or an image a user gives.

Nothing here downloads: a TemplateFlow template that is not on disk is an error that
says so.

The template nilearn bundles is the ICBM 152 *nonlinear symmetric 2009a* average
(197 x 233 x 189 voxels, 1 mm), so it goes by TemplateFlow's name for that space,
``MNI152NLin2009aSym`` - not fMRIPrep's default ``MNI152NLin2009cAsym``, which is
another template. nilearn's copy is skull-stripped and rescaled; its coordinates are
the template's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .atomic import OutputSet

#: the template name of nilearn's bundled ICBM 2009a nonlinear symmetric average
NILEARN_TEMPLATE = "MNI152NLin2009aSym"
DEFAULT_TEMPLATE = NILEARN_TEMPLATE
_ENTITY = re.compile(r"^([a-z]+)-([A-Za-z0-9.]+)$")


@dataclass
class Template:
    """A resolved template: its name, its specification entities and its files."""

    name: str
    spec: dict = field(default_factory=dict)
    t1w: str = ""
    mask: str | None = None
    source: str = ""  # "nilearn", "templateflow" or "file"


def split_template(text: str) -> tuple[str, dict]:
    """Split ``Name[:entity-value[:...]]`` as fMRIPrep's ``--output-spaces`` writes it.

    >>> split_template("MNI152NLin6Asym:res-2")
    ('MNI152NLin6Asym', {'res': '2'})
    >>> split_template("MNIPediatricAsym:cohort-4:res-1")
    ('MNIPediatricAsym', {'cohort': '4', 'res': '1'})
    """
    name, *parts = str(text).split(":")
    spec = {}
    for part in parts:
        m = _ENTITY.match(part)
        if not m:
            raise InputError(f"{text}: template specification {part!r} is not entity-value")
        spec[m.group(1)] = m.group(2)
    if not name:
        raise InputError(f"{text!r}: empty template name")
    return name, spec


def _res(spec: dict) -> int:
    try:
        return int(spec.get("res", 1))
    except ValueError:
        raise InputError(f"template resolution must be a number, got {spec['res']!r}") from None


def _from_templateflow(name: str, spec: dict) -> Template | None:
    home = os.environ.get("TEMPLATEFLOW_HOME")
    folder = Path(home) / f"tpl-{name}" if home else None
    if folder is None or not folder.is_dir():
        return None
    cohort = f"_cohort-{spec['cohort']}" if "cohort" in spec else ""
    res = _res(spec)
    root = folder / f"cohort-{spec['cohort']}" if cohort else folder
    for tag in (f"_res-{res:02d}", f"_res-{res}"):
        t1w = root / f"tpl-{name}{cohort}{tag}_T1w.nii.gz"
        if t1w.is_file():
            mask = root / f"tpl-{name}{cohort}{tag}_desc-brain_mask.nii.gz"
            return Template(name, spec, str(t1w), str(mask) if mask.is_file() else None,
                            "templateflow")
    raise InputError(f"{folder}: no T1w image at resolution {res} (TemplateFlow files are "
                     "not downloaded here; fetch them into TEMPLATEFLOW_HOME beforehand)")


def _from_nilearn(spec: dict, outdir: Path) -> Template:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    res = _res(spec)
    if res not in (1, 2):
        raise InputError(f"{NILEARN_TEMPLATE}: nilearn ships resolutions 1 and 2, not {res}")
    outdir.mkdir(parents=True, exist_ok=True)
    stem = outdir / f"tpl-{NILEARN_TEMPLATE}_res-{res:02d}"
    t1w, mask = Path(f"{stem}_T1w.nii.gz"), Path(f"{stem}_desc-brain_mask.nii.gz")
    for dst, make in ((t1w, load_mni152_template), (mask, load_mni152_brain_mask)):
        if not dst.is_file():  # written whole under a temporary name: concurrent runs
            with OutputSet() as out:
                make(resolution=res).to_filename(out.temp(dst))
    return Template(NILEARN_TEMPLATE, spec, str(t1w.resolve()), str(mask.resolve()), "nilearn")


def resolve_template(text: str, outdir: str | os.PathLike = ".") -> Template:
    """The files of a template named ``text`` (or an image path), writing nilearn's
    bundled template into ``outdir`` when that is the one asked for.

    Order: an existing image file; TemplateFlow under ``$TEMPLATEFLOW_HOME``; nilearn's
    ``MNI152NLin2009aSym``. Anything else is an :class:`~synthmorph_nipype.errors.InputError`.
    """
    path = Path(str(text))
    if path.suffix in (".gz", ".nii", ".mgz") or path.is_file():
        if not path.is_file():
            raise InputError(f"{text}: template image not found")
        stem = path.name.split(".")[0]
        name = stem[4:].split("_")[0] if stem.startswith("tpl-") else stem
        # a BIDS label: letters and digits only (it becomes to-<name>, space-<name>)
        name = re.sub(r"[^A-Za-z0-9]", "", name) or "custom"
        return Template(name, {}, str(path.resolve()), None, "file")
    name, spec = split_template(text)
    found = _from_templateflow(name, spec)
    if found is not None:
        return found
    if name == NILEARN_TEMPLATE:
        return _from_nilearn(spec, Path(outdir))
    raise InputError(f"{name}: template not available offline (give an image file, put it "
                     f"in TEMPLATEFLOW_HOME, or use {NILEARN_TEMPLATE}, which nilearn ships)")
