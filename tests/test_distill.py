"""Distillation (``distill_weight``): the U-Net taught the field the test-time refinement
reaches from its own, on small synthetic pairs."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

from synthmorph_nipype.errors import InputError
from synthmorph_nipype.ops.integrate import integrate_svf
from synthmorph_nipype.synthesis.generator import SynthConfig
from synthmorph_nipype.training.config import TrainConfig, read_config
from synthmorph_nipype.training.data import LabelSource
from synthmorph_nipype.training.distill import Distillation, brain_mask, teacher_svf
from synthmorph_nipype.training.tasks import DeformTask, end_point_error
from synthmorph_nipype.training.trainer import Trainer, make_pair

TINY = {"hyp_units": [4, 4], "enc_nf": [4, 4, 4, 4], "dec_nf": [4, 4, 4, 4], "add_nf": [4]}


def _pair(seed: int = 0, **synth):
    src = LabelSource((32,) * 3, 4.0, shapes_prob=1.0)
    cfg = SynthConfig.identity(voxel_size=4.0, **synth)
    return make_pair(src, cfg, torch.Generator().manual_seed(seed), torch.device("cpu"),
                     displacement=True)


def test_the_teacher_moves_towards_the_true_displacement():
    """From the identity, the refinement the teacher runs brings the displacement closer
    to the pair's known one (labelled voxels)."""
    pair = _pair(seed=2, shift_mm=4.0)
    assert pair.disp_truth is not None
    zero = torch.zeros(*pair.image_1.shape[2:], 3)
    before = float(end_point_error(zero, pair.disp_truth, pair.onehot_2))
    refined = teacher_svf(zero, pair.image_1, pair.image_2, pair.onehot_1, pair.onehot_2,
                          Distillation(weight=1.0, iterations=20))
    after = float(end_point_error(integrate_svf(refined, 7), pair.disp_truth, pair.onehot_2))
    assert before > 0.5  # voxels: there is something to find
    assert after < 0.75 * before  # (0.61 of it)


def test_brain_mask_grows_the_labelled_voxels_by_one():
    onehot = torch.zeros(1, 3, 8, 8, 8)
    onehot[0, 0] = 1
    onehot[0, 0, 3:5, 3:5, 3:5], onehot[0, 2, 3:5, 3:5, 3:5] = 0, 1
    mask = brain_mask(onehot)
    assert mask.shape == (8, 8, 8) and int(mask.sum()) == 4**3
    assert bool(mask[2:6, 2:6, 2:6].all())
    assert bool(brain_mask(torch.ones(1, 1, 4, 4, 4)).all())  # nothing labelled: all count


def test_a_distillation_step_adds_the_distance_to_the_refined_field():
    """The objective of a distillation step is the plain one (at the engine's lambda) plus
    ``(1 - lambda) * weight *`` the end-point error to the refined displacement, and the
    U-Net gets a gradient from it."""
    torch.manual_seed(0)
    config = TrainConfig(model="joint", widths=TINY, grid=32, voxel_mm=4.0).model_config()
    plain = DeformTask(config, similarity="dice")
    taught = DeformTask(config, similarity="dice",
                        distill=Distillation(weight=2.0, prob=1.0, iterations=5))
    taught.model = copy.deepcopy(plain.model)
    pair = _pair(seed=2, warp_std_mm=4.0)
    loss, terms = taught.loss(pair, torch.Generator().manual_seed(0))
    ref, ref_terms = plain.loss(pair, torch.Generator(), lam=0.5)
    assert terms["lambda"] == 0.5 and "distill" not in ref_terms
    assert terms["distill"] > 0.01  # voxels: the teacher moved the field
    expected = float(ref.detach()) + 0.5 * 2.0 * terms["distill"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    loss.backward()
    # the gradient is that of the plain objective plus the term's, towards a target that
    # carries none (the teacher is not differentiated)
    svf, _ = plain.velocity(pair, 0.5)  # (the same weights as the taught U-Net's)
    target = integrate_svf(teacher_svf(svf, pair.image_1, pair.image_2, pair.onehot_1,
                                       pair.onehot_2, taught.distill), plain.steps)
    assert not target.requires_grad
    epe = end_point_error(integrate_svf(svf, plain.steps), target, pair.onehot_2,
                          plain.stride)
    assert float(epe.detach()) == pytest.approx(terms["distill"], rel=1e-4)
    (ref + 0.5 * 2.0 * epe).backward()
    for mine, theirs in zip(taught.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-3, atol=1e-7)


def test_without_distillation_a_step_draws_what_it_drew_before():
    """``distill_weight`` 0 (the default) draws nothing more from the generator: runs
    started before distillation existed resume as they were."""
    torch.manual_seed(0)
    config = TrainConfig(model="joint", widths=TINY, grid=32, voxel_mm=4.0).model_config()
    pair = _pair(seed=4, warp_std_mm=4.0)
    states, lams = [], []
    for distill in (None, Distillation(weight=0.0, prob=1.0)):
        task = DeformTask(config, similarity="dice", distill=distill)
        gen = torch.Generator().manual_seed(5)
        _, terms = task.loss(pair, gen)
        states.append(gen.get_state())
        lams.append(terms["lambda"])
    assert torch.equal(states[0], states[1]) and lams[0] == lams[1]
    expected = float(torch.rand((), generator=torch.Generator().manual_seed(5)))
    assert lams[0] == pytest.approx(expected)


def test_distillation_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="joint"):
        TrainConfig(model="affine", distill_weight=1.0)
    with pytest.raises(ValueError, match="similarity"):
        TrainConfig(model="joint", voxel_mm=4.0, distill_weight=1.0,
                    distill_similarity="dice")
    with pytest.raises(ValueError, match="iteration"):
        TrainConfig(model="joint", voxel_mm=4.0, distill_weight=1.0, distill_iterations=0)
    with pytest.raises(ValueError, match="4 mm"):
        TrainConfig(model="joint", voxel_mm=2.0, distill_weight=1.0)
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "joint"\ndistill_prob = 1.5\n')
    with pytest.raises(InputError, match="bad.toml.*prob"):
        read_config(bad)


def test_a_distilling_run_logs_the_term_on_its_distillation_steps(tmp_path):
    config = TrainConfig(model="joint", widths=TINY, steps=4, grid=32, voxel_mm=4.0,
                         shapes_prob=1.0, val_pairs=1, val_every=4, ckpt_every=4, threads=1,
                         amp=False, similarity="dice", distill_weight=1.0, distill_prob=0.5,
                         distill_iterations=3, seed=0)
    Trainer(config, tmp_path).run()
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    values = np.array([float(r["distill"]) for r in rows])
    lams = np.array([float(r["lambda"]) for r in rows])
    taught = ~np.isnan(values)
    assert taught.any() and (~taught).any()  # seed 0 draws both kinds in four steps
    assert (values[taught] > 0.01).all() and (lams[taught] == 0.5).all()
