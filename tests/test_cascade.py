"""The deformable network run as a cascade (``--passes``)."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
import torch
from nipype.interfaces.base import isdefined

from synthmorph_nipype.cli.main import main
from synthmorph_nipype.engine.network import cascade_svf
from synthmorph_nipype.engine.register import register
from synthmorph_nipype.engine.weights import load_models
from synthmorph_nipype.errors import SynthMorphError, WeightsError
from synthmorph_nipype.interfaces import SynthMorphRegister
from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint
from synthmorph_nipype.models.joint import UNetConfig
from synthmorph_nipype.ops.grid import voxel_grid
from synthmorph_nipype.ops.integrate import upsample_field
from synthmorph_nipype.ops.sampling import sample_linear
from synthmorph_nipype.workflows import init_synthmorph_wf


class CentroidNet(torch.nn.Module):
    """A stand-in for the U-Net that sees only how far apart its two images' centres of
    mass are and predicts a constant field covering ``share`` of that distance (on the
    grid it is given: with ``prepool`` the engine hands it the pooled images)."""

    def __init__(self, share: float, prepool: int = 1):
        super().__init__()
        self.share = share
        self.config = UNetConfig(prepool=prepool)
        self.grids = []  # the grid of every call

    def forward(self, pair: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        assert pooled == (self.config.prepool > 1)
        self.grids.append(tuple(pair.shape[2:]))
        grid = voxel_grid(pair.shape[2:])
        centres = [(grid * im[..., None]).sum((0, 1, 2)) / im.sum() for im in pair[0]]
        shift = self.share * (centres[0] - centres[1])  # image 2 point -> image 1 point
        return shift.view(1, 3, 1, 1, 1).expand(1, 3, *pair.shape[2:])


@pytest.mark.parametrize("prepool", [1, 2])
def test_each_pass_corrects_what_the_passes_before_left(prepool):
    """A network that finds half of a shift leaves half after one pass, a quarter after
    two, an eighth after three: each pass sees the images warped by the SVF so far, in
    the right direction (the wrong one would leave more after every pass). A U-Net that
    pools its inputs gets them pooled, and the SVF stays on its grid, in its voxels."""
    n = 40
    grid = voxel_grid((n, n, n))
    shift = torch.tensor([3.0, -2.0, 1.5])
    def blob(centre):
        return torch.exp(-((grid - centre) ** 2).sum(-1) / (2 * 4.0 ** 2))

    centre = torch.full((3,), (n - 1) / 2)
    image_2, image_1 = blob(centre), blob(centre + shift)
    left, m = [], n // prepool
    for passes in (1, 2, 3):
        net = CentroidNet(0.5, prepool)
        svf, lam = cascade_svf(net, image_1, image_2, passes)
        assert lam is None and svf.shape == (m, m, m, 3)
        assert net.grids == [(m, m, m)] * 2 * passes  # both directions each pass
        found = prepool * svf[m // 2, m // 2, m // 2]  # in the images' voxels
        left.append(float((found - shift).norm() / shift.norm()))
    np.testing.assert_allclose(left, [0.5, 0.25, 0.125], atol=0.03)
    # the result pulls image 1 onto image 2
    svf = cascade_svf(CentroidNet(0.5, prepool), image_1, image_2, 6)[0]
    moved = sample_linear(image_1, grid + upsample_field(svf, (n, n, n), prepool))
    assert float((moved - image_2).abs().max()) < 0.05
    with pytest.raises(ValueError, match="at least once"):
        cascade_svf(CentroidNet(0.5), image_1, image_2, 0)


def test_passes_come_from_the_weights_and_reach_every_layer(nipype_pair, tmp_path, capsys):
    """The weights' ``passes`` is the default (FreeSurfer's and ours without it: 1), an
    explicit one wins, and the command line, the interface, the workflow pass it on."""
    model = load_checkpoint(nipype_pair["weights"])
    advised = tmp_path / "advised.pt"
    save_checkpoint(advised, meta={**model["meta"], "passes": 2}, affine=model["affine"],
                    deform=model["deform"])
    models = load_models("joint", [advised])
    assert models.passes == 2 and load_models("joint", [nipype_pair["weights"]]).passes == 1
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, meta={**model["meta"], "passes": 0}, affine=model["affine"],
                    deform=model["deform"])
    with pytest.raises(WeightsError, match="wrong.pt: its passes 0"):
        load_models("joint", [wrong])
    moving, fixed = nb.load(nipype_pair["moving"]), nb.load(nipype_pair["fixed"])

    def field(**kwargs):
        result = register(moving, fixed, models, mode="joint", extent=192, refine=0,
                          refine_affine=0, outputs=("forward",), **kwargs)
        return result.info.get("passes", 1), result.forward.transforms[1].field

    (advised_passes, two), (one_pass, one) = field(), field(passes=1)
    assert (advised_passes, one_pass) == (2, 1)
    assert np.abs(two - one).max() > 1e-3  # the second pass changed the field
    # a field that is then refined gets the weights' refine_passes (default: passes)
    assert models.cascade(5) == 2 and models.cascade(0) == 2
    refined = tmp_path / "refined.pt"
    save_checkpoint(refined, meta={**model["meta"], "passes": 3, "refine_passes": 1},
                    affine=model["affine"], deform=model["deform"])
    with_refine = load_models("joint", [refined])
    assert (with_refine.cascade(0), with_refine.cascade(5)) == (3, 1)
    result = register(moving, fixed, with_refine, mode="joint", extent=192, refine=2,
                      refine_affine=0, outputs=("forward",))
    assert result.info.get("passes", 1) == 1 and result.info["refine"] == 2
    save_checkpoint(wrong, meta={**model["meta"], "refine_passes": 0},
                    affine=model["affine"], deform=model["deform"])
    with pytest.raises(WeightsError, match="wrong.pt: its refine_passes 0"):
        load_models("joint", [wrong])
    with pytest.raises(SynthMorphError, match="at least once"):
        field(passes=0)
    with pytest.raises(SynthMorphError, match="deformable modes"):  # not silently ignored
        register(moving, fixed, models, mode="affine", extent=192, refine_affine=0,
                 passes=2)
    base = ["register", "-e", "192", "-j", "1", "-w", str(advised), "--refine", "0",
            "--refine-affine", "0", str(nipype_pair["moving"]), str(nipype_pair["fixed"]),
            "-t", str(tmp_path / "f.h5")]
    assert main(base) == 0
    assert "network ran in 2 passes" in capsys.readouterr().out
    assert main(base + ["--passes", "3"]) == 0
    assert "network ran in 3 passes" in capsys.readouterr().out
    (tmp_path / "f.h5").unlink()
    affine = base[:-2] + ["-m", "affine", "--passes", "2", "-t", str(tmp_path / "a.txt")]
    assert main(affine) == 1
    assert "--passes applies to the deformable modes" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists()
    with pytest.raises(SystemExit):
        main(base + ["--passes", "0"])
    reg = SynthMorphRegister(moving_image=str(nipype_pair["moving"]),
                             fixed_image=str(nipype_pair["fixed"]), passes=3)
    assert "--passes 3" in reg.cmdline
    wf = init_synthmorph_wf(mode="joint", passes=2)
    assert wf.get_node("deform_reg").inputs.passes == 2
    assert not isdefined(init_synthmorph_wf(mode="joint").get_node("deform_reg").inputs.passes)
