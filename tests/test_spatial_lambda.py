"""Spatially varying regularisation: the lambda head, its objective, training from a hyper
U-Net, and the weight map through the engine and the command line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from synthmorph_nipype.models.joint import HyperUNet, UNetConfig, lambda_head, split_lambda
from synthmorph_nipype.ops.regularity import beta_prior, grad_l2, grad_sq, weighted_grad_l2
from synthmorph_nipype.synthesis.generator import SynthConfig
from synthmorph_nipype.training.config import TrainConfig
from synthmorph_nipype.training.data import LabelSource
from synthmorph_nipype.training.tasks import DeformTask, load_start
from synthmorph_nipype.training.trainer import make_pair

WIDTHS = {"enc_nf": [8, 8, 8, 8], "dec_nf": [8, 8, 8, 8], "add_nf": [8]}


def test_penalty_and_prior_against_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(1, 3, 6, 5, 4, generator=gen)
    w = torch.rand(1, 1, 6, 5, 4, generator=gen)
    # by hand: squared forward differences at voxel (i, j, k) towards (i+1, j, k) etc.
    inner = u[..., :-1, :-1, :-1]
    manual = ((u[..., 1:, :-1, :-1] - inner) ** 2 + (u[..., :-1, 1:, :-1] - inner) ** 2
              + (u[..., :-1, :-1, 1:] - inner) ** 2).sum(1, keepdim=True) / 3
    assert torch.allclose(grad_sq(u), manual)
    assert torch.isclose(weighted_grad_l2(u, w), (w[..., :-1, :-1, :-1] * manual).mean())
    # a uniform weight of 1 gives (about) the global penalty, summed over components
    assert torch.isclose(weighted_grad_l2(u, torch.ones_like(w)), 3 * grad_l2(u), rtol=0.3)
    lam = torch.rand(1, 1, 4, 4, 4, generator=gen).clamp_min(1e-3)
    assert torch.isclose(beta_prior(lam, 3.0), -2.0 * lam.log().mean())
    assert float(beta_prior(lam, 1.0)) == 0.0  # alpha 1: the uniform prior


def test_optimal_weight_map_follows_the_deformation():
    # with the field fixed, each voxel's weight minimises w g lam / N' + (1 - alpha) log lam
    # / N (g its squared gradient, N' = (n-1)^3 voxels have one, N = n^3 a weight): lam* =
    # min(1, (alpha - 1) N' / (w g N)), low where the field bends
    n, alpha, weight = 16, 1.5, 20.0
    i = torch.arange(n, dtype=torch.float32)
    u = torch.zeros(1, 3, n, n, n)
    u[0, 0] = (0.4 * torch.sin(i / 2.0))[None, None, :] * (i >= n // 2)[:, None, None]
    logit = torch.zeros(1, 1, n, n, n, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=0.1)
    for _ in range(400):
        lam = torch.sigmoid(logit).clamp(1e-6, 1)
        loss = weight * weighted_grad_l2(u, lam) + beta_prior(lam, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lam = torch.sigmoid(logit.detach())[0, 0, :-1, :-1, :-1]
    g = grad_sq(u)[0, 0]
    expected = ((alpha - 1) * (n - 1) ** 3 / (weight * g * n**3)).clamp(max=1)
    bent = g > 1e-3
    assert bent.any() and (~bent).any()
    assert torch.allclose(lam[bent], expected[bent], atol=0.03)
    strong = expected < 0.5
    assert int(strong.sum()) >= 50 and float(lam[strong].mean()) < 0.5
    assert float(lam[~bent].min()) > 0.9


def test_lambda_head_task_trains_the_head_and_the_field():
    config = TrainConfig(model="joint", widths=WIDTHS, spatial_lambda=True, prior_alpha=1.2)
    torch.manual_seed(0)
    task = DeformTask(config.model_config(), prior_alpha=1.2, penalty_weight=5.0)
    src = LabelSource((32,) * 3, 2.0, shapes_prob=1.0)
    cfg = SynthConfig(voxel_size=2.0, flip_prob=0.0, warp_std_mm=4.0)
    pair = make_pair(src, cfg, torch.Generator().manual_seed(3), torch.device("cpu"))
    before = task.evaluate(pair)
    assert abs(before["lambda_mean"] - 0.5) < 0.01  # the head starts at sigmoid(0)
    loss, terms = task.loss(pair, torch.Generator().manual_seed(0))
    loss.backward()
    head = task.model.convs[-1]
    # the head's channel and the velocity channels both receive gradients
    assert float(head.weight.grad[3].abs().sum()) > 0
    assert float(head.weight.grad[:3].abs().sum()) > 0
    # the loss is the documented sum
    with torch.no_grad():
        d1, d2, lam_map = task.fields(pair, 0.5)
    assert set(terms) == {"sim", "reg", "lambda"}
    assert abs(terms["lambda"] - float(lam_map.mean())) < 1e-6
    expected = terms["sim"] + 5.0 * terms["reg"] + float(beta_prior(lam_map, 1.2))
    assert abs(float(loss.detach()) - expected) < 1e-5


def test_the_map_objective_trains_the_head_alone():
    # the prior on lambda (and the penalty through lambda) reaches the head's own weights,
    # never the shared features: pulled by the prior, those grew under Adam until the field
    # exploded (fine-tuning the embedded model, alpha 1.1 and 2 alike)
    torch.manual_seed(2)
    task = DeformTask(UNetConfig.from_dict({**WIDTHS, "lambda_head": True}))
    x = torch.rand(1, 2, 16, 16, 16)
    out = task.model(x)
    _, lam = split_lambda(out)
    beta_prior(lam, 1.1).backward()
    convs = task.model.convs
    assert float(convs[-1].weight.grad[3].abs().sum()) > 0
    assert float(convs[-1].weight.grad[:3].abs().sum()) == 0
    assert all(c.weight.grad is None or float(c.weight.grad.abs().sum()) == 0
               for c in convs[:-1])
    # the velocity channels still train every layer, and the head is the plain convolution
    task.model.zero_grad()
    task.model(x)[:, :3].pow(2).sum().backward()
    assert all(float(c.weight.grad.abs().sum()) > 0 for c in convs[:-1])
    with torch.no_grad():
        plain = torch.nn.functional.conv3d(torch.ones(1, 8, 4, 4, 4), convs[-1].weight,
                                           convs[-1].bias, padding=1)
        mine = lambda_head(convs[-1])(torch.ones(1, 8, 4, 4, 4))
    assert torch.allclose(mine, plain)


def test_a_lambda_head_model_starts_from_a_hyper_unet():
    torch.manual_seed(1)
    hyper = HyperUNet(UNetConfig.from_dict({**WIDTHS, "hyp_units": [4, 4]}))
    spatial_config = dataclasses.replace(hyper.config, lambda_head=True)
    task = DeformTask(spatial_config)
    load_start(task.model, hyper, lam=0.5)
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        expected = hyper(x, 0.5)
        got = task.model(x)
    assert got.shape[1] == 4 and torch.allclose(got[:, :3], expected, rtol=1e-4, atol=1e-3)


def test_train_and_register_with_a_lambda_map(nipype_pair, tmp_path, capsys):
    import json

    import nibabel as nb
    import numpy as np

    from synthmorph_nipype.cli.main import main
    from synthmorph_nipype.engine.weights import load_models

    cfg = tmp_path / "svr.json"
    cfg.write_text(json.dumps({"widths": WIDTHS, "grid": 32, "shapes_prob": 1.0,
                               "val_pairs": 1, "val_every": 2, "threads": 1, "amp": False}))
    assert main(["train", "--model", "joint", "--config", str(cfg), "--steps", "2",
                 "--spatial-lambda", "--prior-alpha", "1.5", "--out", str(tmp_path / "run"),
                 "-q"]) == 0
    weights = tmp_path / "run" / "model.pt"
    assert load_models("deform", [weights]).deform.config.lambda_head
    fixed = nb.load(nipype_pair["fixed"])
    out = tmp_path / "lambda.nii.gz"
    assert main(["register", "-m", "deform", "-e", "192", "-j", "1", "-w", str(weights),
                 str(nipype_pair["moving"]), str(nipype_pair["fixed"]),
                 "--out-lambda", str(out)]) == 0
    lam = nb.load(out)
    assert lam.shape == fixed.shape and np.allclose(lam.affine, fixed.affine)
    data = lam.get_fdata()
    assert 0 < data.min() and data.max() <= 1 and data.std() > 0
    # a model without the head refuses, before writing anything
    capsys.readouterr()
    assert main(["register", "-m", "deform", "-e", "192", "-w", str(nipype_pair["weights"]),
                 str(nipype_pair["moving"]), str(nipype_pair["fixed"]),
                 "--out-lambda", str(tmp_path / "none.nii.gz")]) != 0
    assert "no spatially varying regularisation" in capsys.readouterr().err
    assert not (tmp_path / "none.nii.gz").exists()


def _intensity_head_unet() -> torch.nn.Module:
    """A U-Net whose lambda logit is ``6 (image 1 + image 2) - 3`` at every voxel, and
    whose field is zero: every convolution passes one channel through its centre tap (the
    encoder's first sums both images; each decoder conv reads its skip's first channel)."""
    from synthmorph_nipype.models.joint import UNet

    unet = UNet(UNetConfig.from_dict({**WIDTHS, "lambda_head": True}))
    levels = len(WIDTHS["enc_nf"])
    with torch.no_grad():
        for k, conv in enumerate(unet.convs):
            conv.weight.zero_()
            conv.bias.zero_()
            cin = conv.weight.shape[1]
            source = 8 if cin == 16 and k > levels else 0  # a skip's first channel
            if k == len(unet.convs) - 1:
                conv.weight[3, 0, 1, 1, 1], conv.bias[3] = 6.0, -3.0
            elif k == 0:
                conv.weight[0, :, 1, 1, 1] = 1.0
            else:
                conv.weight[0, source, 1, 1, 1] = 1.0
    return unet.eval()


def test_the_lambda_map_lies_on_the_fixed_grid(nipype_pair, tmp_path, capsys):
    # an independent check of where the map lands: with a head that follows the image
    # intensity, the written map (read back by nibabel) correlates best with the fixed
    # image at zero shift, not one voxel off along any axis
    import nibabel as nb
    import numpy as np

    from synthmorph_nipype.cli.main import main
    from synthmorph_nipype.models.checkpoint import save_checkpoint

    weights = tmp_path / "intensity.pt"
    save_checkpoint(weights, deform=_intensity_head_unet())
    fixed = nipype_pair["fixed"]
    out = tmp_path / "lambda.nii.gz"
    capsys.readouterr()
    assert main(["register", "-m", "deform", "-e", "192", "-j", "1", "-w", str(weights),
                 "-r", "0.3", "--refine", "0", str(fixed), str(fixed),
                 "--out-lambda", str(out)]) == 0
    assert "-r only weights the test-time refinement" in capsys.readouterr().err
    lam = nb.load(out)
    image = nb.load(fixed)
    assert np.allclose(lam.affine, image.affine) and lam.shape == image.shape
    a, b = lam.get_fdata(), image.get_fdata()
    assert a.min() < 0.2 and a.max() > 0.9  # the head's range is used

    def corr(shift: tuple[int, int, int]) -> float:
        inner = tuple(slice(2, n - 2) for n in a.shape)
        moved = np.roll(b, shift, axis=(0, 1, 2))
        return float(np.corrcoef(a[inner].ravel(), moved[inner].ravel())[0, 1])

    centre = corr((0, 0, 0))
    assert centre > 0.8
    for axis in range(3):
        up, down = (corr(tuple(step if k == axis else 0 for k in range(3))) for step in (1, -1))
        drop = centre - max(up, down)
        # lower one voxel off either way, and by the same amount: a half-voxel error in
        # the map's placement would favour one side
        assert drop > 0.005 and abs(up - down) < 0.2 * drop, (axis, centre, up, down)


@pytest.mark.filterwarnings("ignore")  # pybids chatter
def test_bids_app_writes_the_lambda_map_as_a_derivative(tmp_path):
    import json

    import nibabel as nb
    from bids import BIDSLayout

    from synthmorph_nipype.bids_app.cli import main as bids_main
    from synthmorph_nipype.bids_app.demo import make_demo_dataset
    from synthmorph_nipype.models import AffineConfig, AffineDetector
    from synthmorph_nipype.models.checkpoint import save_checkpoint
    from synthmorph_nipype.models.joint import UNet

    torch.manual_seed(0)
    weights = tmp_path / "svr.pt"
    unet = UNet(UNetConfig.from_dict({**WIDTHS, "lambda_head": True}))
    with torch.no_grad():
        unet.convs[-1].weight.mul_(0.01)
    save_checkpoint(weights, affine=AffineDetector(AffineConfig(
        num_feat=6, enc_nf=(4, 5, 6, 7), add_nf=(7, 6, 5, 4))).eval(), deform=unet.eval())
    bids = make_demo_dataset(tmp_path / "bids", n_subjects=1)
    out = tmp_path / "out"
    code = bids_main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"),
                      "--weights", str(weights), "--extent", "192", "--nprocs", "1",
                      "--template", "MNI152NLin2009aSym:res-2", "--refine", "0",
                      "--refine-affine", "0", "--contrasts", "T1w"])
    assert code == 0
    layout = BIDSLayout(str(out), config=["bids", "derivatives"], validate=False)
    found = layout.get(subject="01", desc="lambda", extension=".nii.gz")
    assert len(found) == 1
    path = found[0].path
    moved = layout.get(subject="01", desc="preproc", extension=".nii.gz")[0].path
    lam, ref = nb.load(path), nb.load(moved)
    assert lam.shape == ref.shape and 0 < lam.get_fdata().min()
    with open(path.replace(".nii.gz", ".json")) as f:
        sidecar = json.load(f)
    assert "regularisation weight" in sidecar["Description"]

