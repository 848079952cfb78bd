"""BIDS derivatives as fMRIPrep names them: paths (pybids ``build_path``), atomic writes,
sidecars and the dataset description.

fMRIPrep and sMRIPrep reuse precomputed anatomical-to-template transforms found under
``--derivatives`` by entities: ``from-T1w_to-<tpl>_mode-image_xfm.h5`` and the reverse
``from-<tpl>_to-T1w``; both must be present.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from bids.layout.writing import build_path
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from .. import __version__
from ..io.atomic import atomic_copy, atomic_write_text

PATTERNS = [
    "sub-{subject}[/ses-{session}]/{datatype<anat|figures>|anat}/sub-{subject}[_ses-{session}]"
    "[_from-{from}][_to-{to}][_mode-{mode<image>}][_space-{space}][_res-{res}][_desc-{desc}]"
    "_{suffix<xfm|T1w|T2w|FLAIR|PDw|T2starw|inplaneT1|inplaneT2|mask>}"
    "{extension<.h5|.txt|.nii.gz|.json|.svg|.png>|.nii.gz}",
]
BIDS_VERSION = "1.10.0"
PIPELINE = "synthmorph-nipype"


def derivative_path(entities: dict) -> str:
    """Relative path of a derivative from its entities.

    >>> derivative_path({"subject": "01", "from": "T1w", "to": "MNI152NLin2009aSym",
    ...                  "mode": "image", "suffix": "xfm", "extension": ".h5"})
    'sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5'
    >>> derivative_path({"subject": "01", "session": "a", "space": "MNI152NLin2009aSym",
    ...                  "res": "2", "desc": "preproc", "suffix": "T1w"})
    'sub-01/ses-a/anat/sub-01_ses-a_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz'
    """
    path = build_path({k: v for k, v in entities.items() if v not in (None, "")}, PATTERNS)
    if path is None:
        raise ValueError(f"no derivative name for entities {entities}")
    return path


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file (read in blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_dataset_description(output_dir: str | Path, bids_dir: str | Path | None = None
                              ) -> Path:
    """``dataset_description.json`` of the derivatives (``DatasetType: derivative``,
    ``GeneratedBy``) and a ``.bidsignore`` for the transforms; written once, atomically,
    so concurrent participant runs cannot interleave it: the first writer wins (a hard
link fails on an existing name) and an existing description is kept."""
    out = Path(output_dir)
    desc = out / "dataset_description.json"
    if not desc.exists():
        content = {
            "Name": "SynthMorph registration derivatives",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": PIPELINE, "Version": __version__,
                             "Description": "SynthMorph registration in PyTorch"}],
        }
        if bids_dir is not None:  # resolves the sidecars' bids:raw: URIs
            uri = Path(bids_dir).resolve().as_uri()
            content["SourceDatasets"] = [{"URL": uri}]
            content["DatasetLinks"] = {"raw": uri}
        fd, tmp = tempfile.mkstemp(prefix=".dataset_description.", dir=out)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(content, f, indent=2)
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, desc)  # atomic, and fails if another run has just made it
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system: rename (last one wins)
                os.replace(tmp, desc)
        finally:
            Path(tmp).unlink(missing_ok=True)
    ignore = out / ".bidsignore"
    have = ignore.read_text().splitlines() if ignore.exists() else []
    missing = [line for line in BIDSIGNORE if line not in have]
    if missing:  # (an older version's file gets the lines it lacks)
        atomic_write_text(ignore, "\n".join([*have, *missing]) + "\n")
    return desc


#: What the BIDS validator is told to skip: transforms (no BIDS name for them yet), the
#: reports, their figures and logs, and the group-level files (as fMRIPrep does). Folder
#: names without a trailing slash: the validator (3.x) ignores "figures/" patterns.
BIDSIGNORE = ("*_xfm.*", "*.html", "figures", "log", "logs", "group_summary.tsv")


class _DerivativeSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="file to store")
    output_dir = traits.Str(mandatory=True, desc="derivatives root")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the derivative")
    source_file = traits.Either(traits.Str, traits.List(traits.Str), desc="raw inputs")
    bids_dir = traits.Str(desc="raw dataset root, for bids: URIs in Sources")
    metadata = traits.Dict(desc="extra sidecar fields")


class _DerivativeSinkOutputSpec(TraitedSpec):
    out_file = File(desc="the stored derivative")
    out_meta = File(desc="its JSON sidecar")


class DerivativeSink(SimpleInterface):
    """Store one derivative under its BIDS name, atomically, with a JSON sidecar
    (``Sources`` and the given metadata). The file is renamed into place before its
    sidecar, so a sidecar always describes a complete file."""

    input_spec = _DerivativeSinkInputSpec
    output_spec = _DerivativeSinkOutputSpec

    def _run_interface(self, runtime):
        ent = dict(self.inputs.entities)
        src = self.inputs.in_file
        if "extension" not in ent:
            name = Path(src).name
            ent["extension"] = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
        out_dir = Path(self.inputs.output_dir)
        dst = out_dir / derivative_path(ent)
        atomic_copy(src, dst)
        meta = dict(self.inputs.metadata) if self.inputs.metadata else {}
        sources = self.inputs.source_file
        if sources:
            sources = [sources] if isinstance(sources, str) else list(sources)
            root = Path(self.inputs.bids_dir).resolve() if self.inputs.bids_dir else None
            meta["Sources"] = [
                f"bids:raw:{Path(s).resolve().relative_to(root)}"
                if root and root in Path(s).resolve().parents else str(s) for s in sources]
        sidecar = dst.with_name(dst.name.split(".")[0] + ".json")
        atomic_write_text(sidecar, json.dumps(meta, indent=2, sort_keys=True))
        self._results.update(out_file=str(dst), out_meta=str(sidecar))
        return runtime
