"""Doctest setup: the interface examples name files, which Nipype checks exist; they run
in a temporary folder holding empty files of those names."""

import pytest

DOCTEST_FILES = ("sub-01_T1w.nii.gz", "tpl-T1w.nii.gz", "fwd_xfm.h5")


@pytest.fixture(autouse=True)
def _doctest_folder(request, tmp_path, monkeypatch):
    if type(request.node).__name__ == "DoctestItem" and ".interfaces." in request.node.name:
        for name in DOCTEST_FILES:
            (tmp_path / name).touch()
        monkeypatch.chdir(tmp_path)
    yield
