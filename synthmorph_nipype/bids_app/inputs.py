"""What a ``synthmorph-bids`` run processes: the dataset index (pybids), the participants
and sessions asked for, and the anatomical images of each.

Every refusal is a :class:`BIDSAppError` with its own exit code, so scripts can tell a
wrong path from an empty selection.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BIDS_EXIT, BIDSAppError

__all__ = ["EXIT", "BIDSAppError", "Unit", "check_output_dir", "index_dataset",
           "read_filters", "select_units", "unreadable"]

LOGGER = logging.getLogger("synthmorph_bids")

#: exit codes of ``synthmorph-bids`` (2 is argparse's usage error)
EXIT = BIDS_EXIT




@dataclass
class Unit:
    """One subject (and session) to process: its reference image and the other contrasts."""

    subject: str
    session: str | None
    reference: str  # path of the reference-contrast image (T1w when present)
    reference_contrast: str
    others: dict[str, str] = field(default_factory=dict)  # contrast -> path

    @property
    def entities(self) -> dict[str, str]:
        ent = {"subject": self.subject}
        if self.session:
            ent["session"] = self.session
        return ent

    @property
    def label(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` and ``01`` both name participant ``01``."""
    return label[len(prefix):] if label.startswith(prefix) else label


def read_filters(path: str | None) -> dict:
    """The ``--bids-filter-file`` (fMRIPrep's format: ``{"t1w": {...}, "t2w": {...}}``,
    keys are lower-case contrasts)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BIDSAppError(f"{path}: not a readable JSON filter file ({err})",
                           "bad_filter") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise BIDSAppError(f"{path}: filters must map a contrast to a dict of entities",
                           "bad_filter")
    return {k.lower(): v for k, v in data.items()}


def index_dataset(bids_dir: str | Path, *, validate: bool = True,
                  database: str | Path | None = None):
    """A pybids layout of ``bids_dir`` (derivatives not indexed)."""
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError

    root = Path(bids_dir)
    if not root.is_dir():
        raise BIDSAppError(f"{bids_dir}: no such directory", "not_bids")
    if not (root / "dataset_description.json").is_file():
        raise BIDSAppError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)",
                           "not_bids")
    try:
        return BIDSLayout(str(root), validate=validate, derivatives=False,
                          database_path=str(database) if database else None)
    except (BIDSValidationError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BIDSAppError(f"{bids_dir}: not a valid BIDS dataset ({first})",
                           "not_bids") from None


def unreadable(path: str | Path) -> str | None:
    """Why an image cannot be read (None when its header can): a broken symlink (e.g. a
    DataLad file never fetched), a missing file, or a file nibabel cannot open."""
    import nibabel as nb

    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "broken symlink (not fetched?)"
    if not path.is_file():
        return "not a file"
    try:
        nb.load(str(path)).header  # noqa: B018 - reading the header is the check
    except Exception as err:  # noqa: BLE001 - nibabel raises many kinds
        return f"not readable ({err.__class__.__name__})"
    return None


def select_units(layout, *, participants=None, sessions=None,
                 contrasts=("T1w", "T2w", "FLAIR", "PDw"), filters=None,
                 skipped: list[str] | None = None) -> list[Unit]:
    """The (subject, session) units to process, each with its anatomical images.

    A requested participant absent from the dataset is an error; a subject without any
    image of ``contrasts``, or with an image that cannot be read (a broken symlink, a
    corrupt header), is skipped with a warning naming it (and listed in ``skipped`` when
    given), and an error only when none is left. Of several runs of a contrast the first
    (lowest ``run-``) is used, with a warning: choose another with
    ``--bids-filter-file``.
    """
    filters = filters or {}
    present = sorted(layout.get_subjects())
    wanted = [strip_prefix(p, "sub-") for p in participants] if participants else present
    missing = [p for p in wanted if p not in present]
    if missing:
        raise BIDSAppError(f"{layout.root}: participant(s) not found: "
                           f"{', '.join('sub-' + m for m in missing)}", "missing_participant")
    if not wanted:
        raise BIDSAppError(f"{layout.root}: no participants in the dataset", "no_participants")
    want_ses = [strip_prefix(s, "ses-") for s in sessions] if sessions else None
    units: list[Unit] = []
    skipped = [] if skipped is None else skipped
    for subject in wanted:
        ses_list = layout.get_sessions(subject=subject) or [None]
        if want_ses is not None:
            ses_list = [s for s in ses_list if s in want_ses]
        for session in ses_list:
            found = {}
            for contrast in contrasts:
                query = {"subject": subject, "datatype": "anat", "suffix": contrast,
                         "extension": [".nii", ".nii.gz"], "return_type": "file",
                         **({"session": session} if session else {}),
                         **filters.get(contrast.lower(), {})}
                try:
                    files = sorted(layout.get(**query))
                except (ValueError, TypeError) as err:  # e.g. an unknown entity in a filter
                    raise BIDSAppError(f"bids filter for {contrast}: {err}",
                                       "bad_filter") from None
                if files:
                    if len(files) > 1:
                        LOGGER.warning("sub-%s: %d %s images (%s); using the first, %s "
                                       "(choose another with --bids-filter-file)", subject,
                                       len(files), contrast,
                                       ", ".join(Path(f).name for f in files),
                                       Path(files[0]).name)
                    found[contrast] = files[0]
            label = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            bad = {f: why for f in found.values() if (why := unreadable(f))}
            if bad:
                for f, why in bad.items():
                    LOGGER.warning("%s: skipped, %s: %s", label, f, why)
                skipped.append(label)
                continue
            if not found:
                LOGGER.warning("%s: no usable anatomical image (%s), skipped", label,
                               "/".join(contrasts))
                skipped.append(label)
                continue
            ref = "T1w" if "T1w" in found else next(c for c in contrasts if c in found)
            units.append(Unit(subject, session, found.pop(ref), ref, found))
    if not units:
        kind = "no_anatomy" if skipped else "no_participants"
        what = "no usable anatomical images" if skipped else "no participants match"
        raise BIDSAppError(f"{layout.root}: {what} ({', '.join(skipped) or 'selection'})",
                           kind)
    return units


def check_output_dir(bids_dir: str | Path, output_dir: str | Path) -> Path:
    """The output directory (resolved, not created): refused inside the input dataset
    (except under its ``derivatives/``) and when it cannot be written."""
    import os

    bids = Path(bids_dir).resolve()
    out = Path(output_dir).resolve()
    if out == bids or (bids in out.parents and not
                       (bids / "derivatives" == out or bids / "derivatives" in out.parents)):
        raise BIDSAppError(f"{output_dir}: output directory inside the input dataset "
                           "(use a folder outside it, or its derivatives/)",
                           "output_inside_input")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BIDSAppError(f"{output_dir}: output directory is not writable "
                           f"({probe} is not a writable folder)", "unwritable_output")
    return out
