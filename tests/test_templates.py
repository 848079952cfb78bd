"""Offline template resolution: nilearn's bundled template, a TemplateFlow folder that is
already on disk, a user image, and clear errors for everything else."""

from __future__ import annotations

import shutil

import nibabel as nb
import numpy as np
import pytest

from synthmorph_nipype.errors import InputError
from synthmorph_nipype.io.templates import resolve_template, split_template


def test_nilearn_template_by_its_honest_name(tmp_path, monkeypatch):
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    tpl = resolve_template("MNI152NLin2009aSym", tmp_path)
    assert tpl.source == "nilearn" and tpl.spec == {}
    img, mask = nb.load(tpl.t1w), nb.load(tpl.mask)
    assert img.shape == mask.shape == (197, 233, 189)
    assert np.allclose(np.diag(img.affine)[:3], 1) and np.allclose(img.affine[:3, 3],
                                                                  [-98, -134, -72])
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}
    with pytest.raises(InputError, match="resolutions 1 and 2"):
        resolve_template("MNI152NLin2009aSym:res-3", tmp_path)


def test_templateflow_home_is_used_when_it_holds_the_template(template, tmp_path,
                                                              monkeypatch):
    home = tmp_path / "tf"
    folder = home / "tpl-MNI152NLin2009cAsym"
    folder.mkdir(parents=True)
    shutil.copy(template, folder / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    tpl = resolve_template("MNI152NLin2009cAsym:res-2", tmp_path)
    assert tpl.source == "templateflow" and tpl.name == "MNI152NLin2009cAsym"
    assert tpl.t1w.endswith("tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz") and tpl.mask is None
    with pytest.raises(InputError, match="no T1w image at resolution 1"):
        resolve_template("MNI152NLin2009cAsym", tmp_path)
    with pytest.raises(InputError, match="not available offline"):
        resolve_template("MNI152NLin6Asym", tmp_path)  # not in that TEMPLATEFLOW_HOME


def test_image_paths_and_bad_specifications(template, tmp_path):
    tpl = resolve_template(str(template), tmp_path)
    assert tpl.source == "file" and tpl.name == "template"
    odd = tmp_path / "MNI152_T1_1mm-brain.nii.gz"  # its name becomes a BIDS label
    shutil.copy(template, odd)
    assert resolve_template(str(odd), tmp_path).name == "MNI152T11mmbrain"
    with pytest.raises(InputError, match="template image not found"):
        resolve_template(str(tmp_path / "missing.nii.gz"), tmp_path)
    with pytest.raises(InputError, match="not entity-value"):
        split_template("MNI152NLin2009aSym:res2")
