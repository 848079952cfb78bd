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
    with pytest.raises(WeightsError, match="no SynthMorph weights installed for mode 'rigid'.*"
                                           "SYNTHMORPH_WEIGHTS_DIR"):
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


def test_register_builds_only_the_directions_asked_for(tiny_weights, template):
    import nibabel as nb
    import numpy as np

    from synthmorph_nipype.engine.register import register

    img = nb.load(template)
    moving = nb.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine)
    models = load_models("joint", [tiny_weights["joint"]])
    both = register(moving, img, models, mode="joint", extent=192)
    fwd = register(moving, img, models, mode="joint", extent=192, outputs=("forward",))
    inv = register(moving, img, models, mode="joint", extent=192, outputs=("inverse",))
    assert fwd.inverse is None and inv.forward is None
    for got, ref in ((fwd.forward, both.forward), (inv.inverse, both.inverse)):
        assert np.array_equal(got.transforms[0].matrix, ref.transforms[0].matrix)
        assert np.array_equal(got.transforms[1].field, ref.transforms[1].field)
    assert np.abs(both.forward.transforms[1].field).max() > 0
