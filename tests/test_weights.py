"""Where default weights come from: -w, FreeSurfer, a site folder, the package."""

from __future__ import annotations

import pytest

from synthmorph_nipype.engine.weights import find_weights, load_models
from synthmorph_nipype.errors import WeightsError


def test_site_folder_and_rigid_fallback(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv("SYNTHMORPH_WEIGHTS_DIR", str(site))
    with pytest.raises(WeightsError, match="no SynthMorph weights installed for mode 'rigid'"):
        find_weights("rigid")
    (site / "synthmorph_nipype.affine.pt").write_bytes(tiny_weights["affine"].read_bytes())
    files = find_weights("rigid")
    assert files == [site / "synthmorph_nipype.affine.pt"]
    assert load_models("rigid", files).affine.config.rigid
    assert not load_models("affine", find_weights("affine")).affine.config.rigid
    with pytest.raises(WeightsError, match="mode 'joint'"):
        find_weights("joint")
    # -w wins over every default
    assert find_weights("joint", [str(tiny_weights["joint"])]) == [tiny_weights["joint"]]
