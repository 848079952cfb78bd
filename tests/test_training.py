"""Training: configuration, label sources, synthetic pairs with known truth, objectives that
learn, resumable deterministic runs, and the synth/train commands."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from synthmorph_nipype.cli.main import main
from synthmorph_nipype.engine.weights import load_models
from synthmorph_nipype.errors import InputError
from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint
from synthmorph_nipype.ops.jacobian import folding_percent, jacobian_det
from synthmorph_nipype.synthesis.generator import SynthConfig
from synthmorph_nipype.training.config import TrainConfig, read_config
from synthmorph_nipype.training.data import LabelSource, grid_matrix
from synthmorph_nipype.training.losses import soft_dice
from synthmorph_nipype.training.tasks import AffineTask, DeformTask, _mapped, warp_onehot
from synthmorph_nipype.training.trainer import Trainer, make_pair

TINY = {
    "affine": {"num_feat": 16, "enc_nf": [8, 8, 8, 8], "add_nf": [8]},
    "joint": {"hyp_units": [4, 4], "enc_nf": [4, 4, 4, 4], "dec_nf": [4, 4, 4, 4],
              "add_nf": [4]},
}


def tiny_config(model: str, **changes) -> TrainConfig:
    base = dict(model=model, widths=TINY["joint" if model == "joint" else "affine"], steps=4,
                grid=32, shapes_prob=1.0, val_pairs=2, val_every=2, ckpt_every=2, threads=1,
                amp=False, lr=1e-3)
    base.update(changes)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------ config

def test_config_files_and_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "affine"\nsteps = 7\n[synth]\nrotate_deg = 5.0\n')
    cfg = read_config(toml, seed=3)
    assert (cfg.model, cfg.steps, cfg.seed) == ("affine", 7, 3)
    assert cfg.synth_config().rotate_deg == 5.0
    assert cfg.widths["num_feat"] == 32  # defaults fill what the file leaves out
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"model": "joint", "stpes": 3}))
    with pytest.raises(InputError, match=r"c\.json: invalid training configuration "
                                         r"\(unknown setting\(s\): stpes\)"):
        read_config(js)
    js.write_text("{nope")
    with pytest.raises(InputError, match=r"c\.json: not valid json"):
        read_config(js)
    js.write_text(json.dumps({"model": "elastic"}))
    with pytest.raises(InputError, match="model must be one of"):
        read_config(js)
    js.write_text(json.dumps({"synth": {"flip_prob": 2}}))
    with pytest.raises(InputError, match="flip_prob must be a probability"):
        read_config(js)


# ------------------------------------------------------------------------------ data

def test_training_grid_is_lia_and_centred():
    mat = grid_matrix((96,) * 3, 2.0, np.array([1.0, 2.0, 3.0]))
    assert nb.aff2axcodes(mat) == ("L", "I", "A")
    assert np.allclose(np.linalg.norm(mat[:3, :3], axis=0), 2.0)
    assert np.allclose(mat @ [48, 48, 48, 1], [1, 2, 3, 1])


def test_template_brain_lands_in_the_middle_of_the_grid():
    from synthmorph_nipype.synthesis.labels import template_labels

    src = LabelSource((48,) * 3, 4.0, shapes_prob=0.0, head_prob=0.0)
    lm = src.draw(torch.Generator().manual_seed(0))
    assert lm.source == "brain" and lm.skull_labels == ()
    lab = lm.labels[0].numpy()
    # the brain's world centroid is the same on the template grid and on the training grid
    tl, taff, _ = template_labels(2, subdivide=True)
    centre = ImageCentre(tl, taff)
    mat = grid_matrix((48,) * 3, 4.0, centre.c_ras)
    got = mat[:3, :3] @ np.argwhere(lab > 0).mean(0) + mat[:3, 3]
    assert np.linalg.norm(got - centre.brain_centroid) < 4.0
    # the loss ignores nothing in a brain without head
    assert torch.equal(lm.loss_labels, torch.arange(int(lab.max()) + 1))


class ImageCentre:
    def __init__(self, labels, affine):
        from synthmorph_nipype.transforms.base import ImageGrid

        self.c_ras = ImageGrid.make(labels.shape, affine).center_ras
        ijk = np.argwhere(labels > 0).mean(0)
        self.brain_centroid = affine[:3, :3] @ ijk + affine[:3, 3]


def test_head_labels_are_strippable_and_ignored_by_the_loss():
    src = LabelSource((32,) * 3, 6.0, shapes_prob=0.0, head_prob=1.0, num_heads=1)
    lm = src.draw(torch.Generator().manual_seed(1))
    assert lm.source == "brain+head" and len(lm.skull_labels) > 0
    assert set(lm.skull_labels) <= set(torch.unique(lm.labels).tolist())
    assert all(int(lm.loss_labels[k]) == 0 for k in lm.skull_labels)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_pair_truth_maps_fixed_onto_moving(flip):
    src = LabelSource((32,) * 3, 2.0, shapes_prob=1.0)
    synth = SynthConfig(voxel_size=2.0, warp_std_mm=0.0, flip_prob=flip, shift_mm=10.0,
                        rotate_deg=15.0)
    pair = make_pair(src, synth, torch.Generator().manual_seed(4), torch.device("cpu"))
    shape = pair.image_1.shape[2:]
    moved = warp_onehot(pair.onehot_1, _mapped(pair.truth.float(), shape))
    ident = warp_onehot(pair.onehot_1, _mapped(torch.eye(4), shape))
    inside = moved.sum(1, keepdim=True) > 0.99  # moving field of view
    d_truth = soft_dice(moved * inside, pair.onehot_2 * inside)
    d_ident = soft_dice(ident * inside, pair.onehot_2 * inside)
    # resampled twice (nearest, then linear) on a coarse grid: 0.84 with the truth
    assert d_truth > 0.75 and d_truth > 4 * d_ident


def test_same_contrast_pairs_and_the_curriculum():
    from synthmorph_nipype.synthesis.generator import sample_pair

    labels = LabelSource((32,) * 3, 2.0).draw(torch.Generator().manual_seed(0)).labels
    cfg = SynthConfig.identity(voxel_size=2.0, noise_min=0.1, noise_max=0.2)
    same = sample_pair(labels, cfg, torch.Generator().manual_seed(1), same_contrast=True)
    other = sample_pair(labels, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(same["image_1"], same["image_2"])
    assert torch.equal(same["image_1"], other["image_1"])
    assert not torch.allclose(other["image_1"], other["image_2"], atol=0.05)

    tc = TrainConfig(model="joint", warmup_steps=100)
    start, p0 = tc.synth_at(0)
    half, p50 = tc.synth_at(50)
    end, p100 = tc.synth_at(100)
    assert (p0, p50, p100) == (1.0, 0.5, 0.0)
    assert start.noise_max == 0 and start.res_prob == 0 and start.bias_std == 0
    assert start.skull_prob == 0 and end.skull_prob == tc.synth_config().skull_prob > 0
    assert half.noise_max == pytest.approx(0.5 * end.noise_max) and end == tc.synth_config()
    assert start.warp_std_mm == end.warp_std_mm  # geometry is not ramped
    kept = TrainConfig(model="joint", warmup_steps=100, same_contrast_final=0.3)
    assert [kept.synth_at(s)[1] for s in (0, 50, 100, 500)] == pytest.approx(
        [1.0, 0.65, 0.3, 0.3])


def test_same_contrast_survives_a_label_missing_from_one_image():
    """Intensities are drawn per label value: a map that lost a label (a head stripped
    from one image of a pair) gives the other labels the intensities they have in the
    full map under the same generator state."""
    from synthmorph_nipype.synthesis.generator import labels_to_image

    full = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    full[:, 2:6], full[:, 6:9], full[:, 9:] = 1, 2, 3
    stripped = torch.where(full == 2, 0, full)
    cfg = SynthConfig.identity(voxel_size=2.0, zero_background_prob=0.0)
    a = labels_to_image(full, cfg, torch.Generator().manual_seed(4), 4)[0, 0]
    b = labels_to_image(stripped, cfg, torch.Generator().manual_seed(4), 4)[0, 0]
    # the same values up to the min-max scaling (label 2 may have set the range)
    kept = [float(a[full[0] == v].mean()) for v in (0, 1, 3)]
    got = [float(b[full[0] == v].mean()) for v in (0, 1, 3)]
    fit = np.polyfit(kept, got, 1)
    assert np.abs(np.polyval(fit, kept) - got).max() < 1e-4, (kept, got)
    assert abs(fit[0]) > 0.5
    assert torch.allclose(b[full[0] == 2], b[full[0] == 0][0])  # label 2 is background now
    with pytest.raises(ValueError, match="num_values"):
        labels_to_image(full, cfg, torch.Generator(), 3)


# ------------------------------------------------------------------------------ objectives

def _fixed_pair(grid=32, seed=0, **synth):
    src = LabelSource((grid,) * 3, 2.0, shapes_prob=1.0)
    cfg = SynthConfig(voxel_size=2.0, flip_prob=0.0, **synth)
    return make_pair(src, cfg, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_affine_objective_learns_a_pair():
    torch.manual_seed(0)
    task = AffineTask(TrainConfig(model="affine", widths=TINY["affine"]).model_config())
    pair = _fixed_pair(shift_mm=8.0, rotate_deg=8.0, warp_std_mm=0.0)
    opt = torch.optim.Adam(task.model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss, terms = task.loss(pair, gen)
        assert terms["sim"] == pytest.approx(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in task.model.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-5:]) < 0.8 * losses[0]
    assert "error_vox" in task.evaluate(pair)


def test_deform_objective_learns_a_pair_without_folding():
    torch.manual_seed(0)
    task = DeformTask(TrainConfig(model="joint", widths=TINY["joint"]).model_config())
    pair = _fixed_pair(shift_mm=0.0, rotate_deg=0.0, scale=0.0, shear=0.0, warp_std_mm=4.0)
    before = task.evaluate(pair)
    assert before["folding_pct"] == 0.0  # starts at the identity
    with torch.no_grad():
        d1, d2, _ = task.fields(pair, 0.5)
    assert d1.abs().max() < 0.2 and d2.abs().max() < 0.2  # voxels
    opt = torch.optim.Adam(task.model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        loss, terms = task.loss(pair, gen)
        assert 0 <= terms["lambda"] <= 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(pair)
    assert after["dice"] > before["dice"] + 0.02


def test_jacobian_determinant_of_a_linear_field():
    a = torch.tensor([[0.1, 0.2, 0.0], [0.0, -0.3, 0.1], [0.05, 0.0, 0.2]], dtype=torch.float64)
    x = torch.stack(torch.meshgrid(*[torch.arange(6.0, dtype=torch.float64)] * 3,
                                   indexing="ij"), -1)
    disp = x @ a.T
    det = jacobian_det(disp)
    assert torch.allclose(det, torch.linalg.det(torch.eye(3, dtype=torch.float64) + a))
    fold = disp.clone()
    fold[..., 0] = -2 * x[..., 0]  # x -> -x: every voxel folds
    assert folding_percent(fold) == 100.0 and folding_percent(disp) == 0.0


# ------------------------------------------------------------------------------ trainer

def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model", ["affine", "joint"])
def test_resumed_run_equals_uninterrupted_run(model, tmp_path):
    straight = Trainer(tiny_config(model, steps=4), tmp_path / "a")
    straight.run(progress=False)
    first = Trainer(tiny_config(model, steps=2), tmp_path / "b")
    first.run(progress=False)
    second = Trainer(tiny_config(model, steps=4), tmp_path / "b")
    assert second.resume() and second.step == 2
    second.run(progress=False)
    a, b = _state(straight.task.model), _state(second.task.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "b" / "train.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("step,loss,sim")
    val = (tmp_path / "b" / "val.csv").read_text().splitlines()
    assert val[0].startswith("step,dice,dice_before") and len(val) == 3
    # a different seed trains a different model
    other = Trainer(tiny_config(model, steps=4, seed=9), tmp_path / "c")
    other.run(progress=False)
    c = _state(other.task.model)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_time_limit_stops_after_one_step_and_resumes(tmp_path):
    trainer = Trainer(tiny_config("affine", steps=50), tmp_path)
    trainer.run(progress=False, max_minutes=0)
    assert trainer.step == 1
    assert load_checkpoint(tmp_path / "model.pt")["meta"]["trained_steps"] == 1
    again = Trainer(tiny_config("affine", steps=2), tmp_path)
    assert again.resume() and again.step == 1


def test_a_termination_signal_stops_after_the_step_with_a_checkpoint(tmp_path):
    """SIGTERM (a session's end, a scheduler's time limit) mid-run: the step in flight
    ends, the checkpoint and model are written at it (no validation), and the run resumes
    there."""
    import os
    import signal
    import threading

    trainer = Trainer(tiny_config("affine", steps=1000, val_every=1000, ckpt_every=1000),
                      tmp_path)

    def send_when_started():
        while trainer.step < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=send_when_started, daemon=True)
    sender.start()
    trainer.run(progress=False)
    sender.join()
    assert trainer.stopped == "SIGTERM"
    assert 2 <= trainer.step < 1000
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == trainer.step
    assert load_checkpoint(tmp_path / "model.pt")["meta"]["trained_steps"] == trainer.step
    assert not (tmp_path / "val.csv").exists()  # stopping skips the validation
    assert signal.getsignal(signal.SIGTERM) == before  # the handler given back
    again = Trainer(tiny_config("affine", steps=trainer.step + 1), tmp_path)
    assert again.resume() and again.step == trainer.step
    again.run(progress=False)
    assert again.stopped is None and again.step == trainer.step + 1


def test_learning_rate_decay_can_be_added_when_resuming(tmp_path):
    Trainer(tiny_config("affine", steps=2), tmp_path / "a").run(progress=False)
    Trainer(tiny_config("affine", steps=2), tmp_path / "b").run(progress=False)
    const = Trainer(tiny_config("affine", steps=4), tmp_path / "a")
    decayed = Trainer(tiny_config("affine", steps=4, lr_decay_start=2, lr_final=1e-6),
                      tmp_path / "b")
    assert const.resume() and decayed.resume()
    const.run(progress=False)
    decayed.run(progress=False)
    # the last update used the final rate; the decayed run moved less than the constant one
    assert decayed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
    assert const.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    a, b = _state(const.task.model), _state(decayed.task.model)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lr_decay_start must lie between 0 and steps"):
        tiny_config("affine", steps=4, lr_decay_start=5)


def test_gradient_clipping_bounds_the_updates_and_logs_the_norm(tmp_path):
    """Clipped far below the gradients' norm, Adam's updates fall under its epsilon: the
    weights move much less than without; the logged norm is the one before clipping."""
    start = _state(Trainer(tiny_config("joint", steps=3), tmp_path / "s").task.model)
    moves, norms = {}, {}
    for name, clip in (("free", None), ("clipped", 1e-9)):
        trainer = Trainer(tiny_config("joint", steps=3, grad_clip=clip), tmp_path / name)
        trainer.run(progress=False)
        end = _state(trainer.task.model)
        moves[name] = sum(float((end[k].float() - start[k].float()).abs().sum()) for k in end)
        with (tmp_path / name / "train.csv").open() as f:
            norms[name] = [float(r["grad_norm"]) for r in csv.DictReader(f)]
    assert norms["clipped"][0] == pytest.approx(norms["free"][0])  # same first pair
    assert min(norms["clipped"]) > 1e-6
    assert moves["clipped"] < 0.01 * moves["free"]
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        tiny_config("joint", grad_clip=0)


def test_resume_refuses_other_settings(tmp_path):
    Trainer(tiny_config("affine", steps=1), tmp_path).run(progress=False)
    with pytest.raises(ValueError, match="made with other settings \\(lr\\)"):
        Trainer(tiny_config("affine", steps=2, lr=0.5), tmp_path).resume()
    (tmp_path / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="checkpoint.pt: not a readable training checkpoint"):
        Trainer(tiny_config("affine", steps=2), tmp_path).resume()
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        tiny_config("affine", device="gpu")


def test_exported_models_load_in_the_engine(tmp_path):
    aff = Trainer(tiny_config("affine", steps=1), tmp_path / "aff")
    aff.run(progress=False)
    aff.export(extra={"refine_affine": 7})  # a shipped detector recommends its refinement
    joint = Trainer(tiny_config("joint", steps=1, affine_weights=str(tmp_path / "aff" /
                                                                     "model.pt")),
                    tmp_path / "joint")
    joint.run(progress=False)
    parts = load_checkpoint(tmp_path / "joint" / "model.pt")
    assert parts["meta"]["trained_steps"] == 1 and "val_dice" in parts["meta"]
    models = load_models("joint", [tmp_path / "joint" / "model.pt"], lam=0.3)
    ref = load_checkpoint(tmp_path / "aff" / "model.pt")["affine"].state_dict()
    assert all(torch.equal(ref[k], v) for k, v in models.affine.state_dict().items())
    assert models.deform is not None
    assert models.refine_affine == 7 and load_models("affine", [tmp_path / "aff" / "model.pt"]
                                                     ).refine_affine == 7


# ------------------------------------------------------------------------------ commands

def test_synth_command_writes_pairs(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"grid": 32, "shapes_prob": 1.0}))
    assert main(["synth", str(tmp_path / "out"), "-n", "2", "--config", str(cfg),
                 "--seed", "5"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"pair{n:03d}_{kind}_{k}.nii.gz" for n in range(2)
                     for kind in ("image", "labels") for k in (1, 2)]
    img = nb.load(tmp_path / "out" / "pair000_image_1.nii.gz")
    lab = nb.load(tmp_path / "out" / "pair000_labels_1.nii.gz")
    assert img.shape == lab.shape == (32, 32, 32) and nb.aff2axcodes(img.affine) == tuple("LIA")
    data = np.asarray(img.dataobj)
    assert 0 <= data.min() and data.max() <= 1 and data.std() > 0.05
    assert np.issubdtype(lab.get_data_dtype(), np.integer) and len(np.unique(lab.dataobj)) > 5
    assert "wrote 2 pairs" in capsys.readouterr().out


def test_continued_run_resumes_without_its_starting_weights(tmp_path, capsys):
    """A run started from trained weights (``init_weights``) whose starting file is gone
    (a later session keeps only the checkpoint) resumes from its checkpoint, with the
    starting file's refinement advice, which its export keeps; without a checkpoint the
    missing file is an error (nothing written)."""
    Trainer(tiny_config("affine", steps=2), tmp_path / "first").run(progress=False)
    start = load_checkpoint(tmp_path / "first" / "model.pt")
    advice = {"refine_affine": 7}
    save_checkpoint(tmp_path / "start.pt", meta={**start["meta"], **advice},
                    affine=start["affine"])
    settings = {k: v for k, v in tiny_config(
        "affine", init_weights=str(tmp_path / "start.pt")).to_dict().items() if k != "synth"}
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(settings))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--steps", "2", "-q"]) == 0
    first = load_checkpoint(out / "model.pt")
    assert first["meta"]["refine_affine"] == 7
    (tmp_path / "start.pt").unlink()
    assert main(["train", "--config", str(cfg), "--out", str(out), "--steps", "4", "-q"]) == 0
    assert "resuming at step 2" in capsys.readouterr().err
    resumed = load_checkpoint(out / "model.pt")
    assert resumed["meta"]["trained_steps"] == 4 and resumed["meta"]["refine_affine"] == 7
    moved = _state(resumed["affine"])
    assert not all(torch.equal(moved[k], v) for k, v in _state(first["affine"]).items())
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "fresh"), "-q"]) == 1
    assert "start.pt: not found" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    assert main(["train", "--config", str(cfg), "--out", str(out), "--restart", "-q"]) == 1
    assert (out / "checkpoint.pt").is_file()  # a refused restart deletes nothing


def test_train_command_then_register(tmp_path, template, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({k: v for k, v in tiny_config("affine").to_dict().items()
                               if k not in ("synth",)}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--steps", "2", "-q"]) == 0
    assert "trained affine for 2 steps" in capsys.readouterr().out
    assert {"checkpoint.pt", "model.pt", "train.csv", "val.csv", "log.jsonl"} <= {
        p.name for p in out.iterdir()}
    assert main(["train", "--config", str(cfg), "--out", str(out), "--steps", "3", "-q"]) == 0
    assert "resuming at step 2" in capsys.readouterr().err
    lta = tmp_path / "x.lta"
    assert main(["register", str(template), str(template), "-m", "affine", "-e", "192",
                 "-w", str(out / "model.pt"), "-t", str(lta)]) == 0
    assert lta.exists()
    assert main(["train", "--model", "joint", "--out", str(tmp_path / "j"), "--affine-weights",
                 str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt: affine weights not found" in capsys.readouterr().err
    assert not (tmp_path / "j").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text("model = 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "no")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.toml" in err


def test_training_fields_are_the_engines_half_resolution_fields():
    """What the trainer optimises is what inference computes: the deformable task's field
    on the training grid equals the engine's half-resolution field for the same inputs
    (mode deform: no mid-space), in direction and size."""
    from synthmorph_nipype.engine.network import run_deformable
    from synthmorph_nipype.training.tasks import Pair

    torch.manual_seed(3)
    task = DeformTask(TrainConfig(model="joint", widths=TINY["joint"]).model_config(), steps=5)
    with torch.no_grad():  # a clearly non-zero field
        for p in task.model.convs[-1].parameters():
            p.mul_(3e4)
    full_1, full_2 = torch.rand(2, 32, 32, 32).unbind(0)
    half_1, half_2 = full_1[::2, ::2, ::2], full_2[::2, ::2, ::2]
    onehot = torch.zeros(1, 2, 16, 16, 16)
    pair = Pair(half_1[None, None], half_2[None, None], onehot, onehot)
    with torch.no_grad():
        d1, d2, _ = task.fields(pair, 0.3)
    out = run_deformable(task.model.specialize(0.3), full_1, full_2, steps=5, keep=True)
    assert d1.abs().max() > 0.5
    assert torch.allclose(out.stages["half_def_1"], d1, atol=1e-4)
    assert torch.allclose(out.stages["half_def_2"], d2, atol=1e-4)
    # the full-resolution map the engine writes at x is twice the field at x / 2
    full = out.out_1.full()[10, 12, 14]
    assert torch.allclose(full, 2 * d1[5, 6, 7], atol=1e-3)


def test_a_pooling_unet_runs_on_the_grid_it_was_trained_on():
    """A U-Net trained on a 4 mm grid and exported with ``prepool=2`` runs there in the
    engine: its SVF stays on the pooled grid (refinement and integration included), the
    field is the training task's for the pooled inputs, and the half-resolution field
    the engine writes is that one upsampled (in half-resolution voxels)."""
    from dataclasses import replace

    from synthmorph_nipype.engine.network import run_deformable
    from synthmorph_nipype.models.joint import HyperUNet
    from synthmorph_nipype.ops.integrate import upsample_field
    from synthmorph_nipype.training.tasks import Pair

    torch.manual_seed(5)
    config = TrainConfig(model="joint", widths=TINY["joint"]).model_config()
    task = DeformTask(config, steps=5)
    with torch.no_grad():  # a clearly non-zero field
        for p in task.model.convs[-1].parameters():
            p.mul_(3e4)
    pooling = HyperUNet(replace(config, prepool=2))
    pooling.load_state_dict(task.model.state_dict())
    full_1, full_2 = torch.rand(2, 64, 64, 64).unbind(0)
    pooled = [torch.nn.functional.avg_pool3d(x[None, None, ::2, ::2, ::2], 2)
              for x in (full_1, full_2)]
    onehot = torch.zeros(1, 2, 16, 16, 16)
    with torch.no_grad():
        d1, d2, _ = task.fields(Pair(*pooled, onehot, onehot), 0.3)
    out = run_deformable(pooling.specialize(0.3), full_1, full_2, steps=5, keep=True)
    assert out.stages["svf_1"].shape == (16, 16, 16, 3) and d1.abs().max() > 0.5
    assert out.stages["half_def_1"].shape == (32, 32, 32, 3)
    assert torch.allclose(out.stages["half_def_1"], upsample_field(d1, (32,) * 3, 2),
                          atol=1e-4)
    assert torch.allclose(out.stages["half_def_2"], upsample_field(d2, (32,) * 3, 2),
                          atol=1e-4)


def test_cascade_training_fields_are_the_engines_cascade(tmp_path):
    """A U-Net trained as a cascade (``passes``) is optimised for what ``--passes`` runs:
    the task's field equals the engine's cascade field for the same inputs, differs from
    one pass, and the exported weights recommend as many passes."""
    from synthmorph_nipype.engine.network import run_deformable
    from synthmorph_nipype.training.tasks import Pair

    torch.manual_seed(4)
    config = TrainConfig(model="joint", widths=TINY["joint"]).model_config()
    task, single = DeformTask(config, steps=5, passes=2), DeformTask(config, steps=5)
    with torch.no_grad():  # a clearly non-zero field
        for p in task.model.convs[-1].parameters():
            p.mul_(3e4)
    single.model.load_state_dict(task.model.state_dict())
    full_1, full_2 = torch.rand(2, 32, 32, 32).unbind(0)
    onehot = torch.zeros(1, 2, 16, 16, 16)
    pair = Pair(full_1[::2, ::2, ::2][None, None], full_2[::2, ::2, ::2][None, None],
                onehot, onehot)
    with torch.no_grad():
        d1, d2, _ = task.fields(pair, 0.3)
        one, _, _ = single.fields(pair, 0.3)
    out = run_deformable(task.model.specialize(0.3), full_1, full_2, steps=5, keep=True,
                         passes=2)
    assert (d1 - one).abs().max() > 0.1
    assert torch.allclose(out.stages["half_def_1"], d1, atol=1e-4)
    assert torch.allclose(out.stages["half_def_2"], d2, atol=1e-4)
    # the loss trains both passes (the gradient reaches the U-Net through the sum)
    loss, _ = task.loss(pair, torch.Generator().manual_seed(0), lam=0.3)
    loss.backward()
    assert all(p.grad is not None for p in task.model.parameters())
    trainer = Trainer(tiny_config("joint", steps=1, passes=2), tmp_path / "run")
    trainer.run(progress=False)
    assert load_models("deform", [tmp_path / "run" / "model.pt"]).passes == 2
    with pytest.raises(ValueError, match="passes"):
        TrainConfig(model="affine", passes=2)
    with pytest.raises(ValueError, match="at least once"):
        DeformTask(config, passes=0)


def test_pooled_detector_trained_at_4mm_is_the_engines_affine(tmp_path):
    """A detector trained on a 4 mm grid and exported with ``prepool=2`` gives the engine
    the same map: 4 mm voxel ``k`` is 2 mm voxel ``2 k + 0.5``, full-resolution ``4 k + 1.5``."""
    from synthmorph_nipype.engine.network import run_affine
    from synthmorph_nipype.models.checkpoint import load_checkpoint
    from synthmorph_nipype.training.tasks import Pair

    config = tiny_config("affine", grid=16, voxel_mm=4.0, widths={**TINY["affine"],
                                                                  "enc_nf": [8, 8, 8]})
    trainer = Trainer(config, tmp_path / "run", log=io.StringIO())
    full_1 = _fixed_pair(grid=64, shift_mm=6.0, warp_std_mm=0.0).image_1[0, 0]
    full_2 = _fixed_pair(grid=64, seed=1, warp_std_mm=0.0).image_1[0, 0]
    pooled = [torch.nn.functional.avg_pool3d(f[::2, ::2, ::2][None, None], 2)
              for f in (full_1, full_2)]
    empty = torch.zeros(1, 2, 16, 16, 16)
    with torch.no_grad():
        quarter = trainer.task.matrix(Pair(*pooled, empty, empty)).numpy()
    exported = load_checkpoint(trainer.export())["affine"].eval()
    assert exported.config.prepool == 2
    out = run_affine(exported, full_1, full_2).out_1
    scale = np.diag([4.0, 4.0, 4.0, 1.0])
    scale[:3, 3] = 1.5
    assert np.abs(quarter - np.eye(4)).max() > 1e-3
    assert np.allclose(scale @ quarter @ np.linalg.inv(scale), out, atol=1e-5)
    with pytest.raises(ValueError, match="voxel_mm must be 2 or 4"):
        tiny_config("joint", voxel_mm=3.0)
    joint = Trainer(tiny_config("joint", voxel_mm=4.0), tmp_path / "joint", log=io.StringIO())
    assert load_checkpoint(joint.export())["deform"].config.prepool == 2


def test_training_matrix_is_the_engines_affine():
    """The affine task's half-resolution matrix is the engine's full-resolution one: the
    official code's centred convention puts half-grid voxel ``i`` at ``2 i + 0.5``."""
    from synthmorph_nipype.engine.network import run_affine
    from synthmorph_nipype.training.tasks import Pair

    torch.manual_seed(4)
    task = AffineTask(TrainConfig(model="affine", widths=TINY["affine"]).model_config())
    full_1, full_2 = _fixed_pair(grid=96, shift_mm=6.0, warp_std_mm=0.0).image_1[0, 0], \
        _fixed_pair(grid=96, seed=1, warp_std_mm=0.0).image_1[0, 0]
    empty = torch.zeros(1, 2, 48, 48, 48)
    pair = Pair(full_1[::2, ::2, ::2][None, None], full_2[::2, ::2, ::2][None, None], empty, empty)
    with torch.no_grad():
        half = task.matrix(pair).numpy()
    out = run_affine(task.model.eval(), full_1, full_2).out_1
    scale = np.diag([2.0, 2.0, 2.0, 1.0])
    scale[:3, 3] = 0.5
    assert np.abs(half - np.eye(4)).max() > 1e-3
    assert np.allclose(scale @ half @ np.linalg.inv(scale), out, atol=1e-5)


def test_checkpoints_from_before_new_settings_still_resume(tmp_path):
    """A checkpoint written before a setting existed resumes as if it had its default."""
    first = Trainer(tiny_config("affine", steps=2), tmp_path / "run", log=io.StringIO())
    first.run(progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for key in ("objective", "images", "init_weights", "extent"):
        state["config"].pop(key)
    torch.save(state, path)
    again = Trainer(tiny_config("affine", steps=4), tmp_path / "run", log=io.StringIO())
    assert again.resume() and again.step == 2
    other = Trainer(tiny_config("affine", steps=4, lr=0.5), tmp_path / "run",
                    log=io.StringIO())
    with pytest.raises(ValueError, match="made with other settings \\(lr\\)"):
        other.resume()


def test_training_a_unet_on_mind_descriptors(tmp_path):
    """``input_features = "mind"`` in a configuration's widths: the trainer builds the U-Net
    on 12 input channels, trains and exports it (prepool 2 for a 4 mm grid), and the
    engine runs the exported network with the MIND inputs it was trained on."""
    from synthmorph_nipype.engine.network import run_deformable
    from synthmorph_nipype.models.checkpoint import load_checkpoint

    toml = tmp_path / "mind.toml"
    toml.write_text('model = "joint"\n[widths]\ninput_features = "mind"\n')
    assert read_config(toml).model_config().input_features == "mind"
    config = tiny_config("joint", voxel_mm=4.0, widths={**TINY["joint"],
                                                        "input_features": "mind"})
    trainer = Trainer(config, tmp_path / "run", log=io.StringIO())
    assert trainer.task.model.convs[0].kernel(trainer.task.model.hyper_features(0.5))[
        0].shape[1] == 12
    before = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
    trainer.run(progress=False)
    after = trainer.task.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    exported = load_checkpoint(tmp_path / "run" / "model.pt")["deform"]
    assert exported.config.input_features == "mind" and exported.config.prepool == 2
    full_1, full_2 = torch.rand(2, 64, 64, 64).unbind(0)
    out = run_deformable(exported.specialize(0.5), full_1, full_2, steps=3)
    assert np.isfinite(out.out_1.full().numpy()).all()


def test_a_run_kept_as_its_weights_resumes_at_their_step(tmp_path):
    """A run kept as its network in float16 (training.milestone) turns back into a
    checkpoint at the same step: the resumed trainer holds those weights (to float16
    rounding) with a fresh optimizer, trains on, and refuses other settings or an
    existing checkpoint."""
    from synthmorph_nipype.errors import InputError
    from synthmorph_nipype.training.milestone import restore_checkpoint, save_weights

    first = Trainer(tiny_config("joint", steps=2), tmp_path / "a")
    first.run(progress=False)
    assert save_weights(tmp_path / "a", tmp_path / "w.pt") == 2
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in saved["model"].values()
               if v.is_floating_point())
    config = tiny_config("joint", steps=4)
    assert restore_checkpoint(config, tmp_path / "w.pt", tmp_path / "b") == 2
    again = Trainer(config, tmp_path / "b")
    assert again.resume() and again.step == 2
    assert not again.optimizer.state_dict()["state"]  # fresh Adam
    want, got = _state(first.task.model), _state(again.task.model)
    fresh = _state(Trainer(config, tmp_path / "fresh").task.model)  # same seed, untrained

    def close(a, b):  # float16 rounding: 2**-11 of each value
        return all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-3)
                   for k in b)
    assert close(got, want) and not close(fresh, want)
    again.run(progress=False)
    assert again.step == 4
    with pytest.raises(InputError, match="exists; not overwritten"):
        restore_checkpoint(config, tmp_path / "w.pt", tmp_path / "b")
    with pytest.raises(InputError, match=r"other settings \(seed\)"):
        restore_checkpoint(tiny_config("joint", seed=5), tmp_path / "w.pt", tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(InputError, match=r"checkpoint\.pt: not a readable training checkpoint"):
        save_weights(tmp_path / "d", tmp_path / "w2.pt")
    assert not (tmp_path / "w2.pt").exists()


def test_export_script_makes_weights_the_engine_loads_with_their_advice(tmp_path):
    """``scripts/export_embedded.py`` (how a run becomes the embedded model): from a run
    folder's checkpoint, weights equal to the trained model's with the refinement advice
    in the metadata, which ``load_models`` reads; a folder without a checkpoint is refused
    with exit code 2 and no output."""
    import subprocess
    import sys

    toml = tmp_path / "tiny.toml"
    toml.write_text('model = "affine"\nsteps = 2\ngrid = 32\nshapes_prob = 1.0\n'
                    'val_pairs = 2\nval_every = 2\nckpt_every = 2\nthreads = 1\n'
                    'amp = false\n[widths]\nnum_feat = 16\nenc_nf = [8, 8, 8, 8]\n'
                    'add_nf = [8]\n')
    trainer = Trainer(read_config(toml), tmp_path / "run")
    trainer.run(progress=False)
    script = Path(__file__).resolve().parents[1] / "scripts" / "export_embedded.py"
    out = tmp_path / "exported.pt"
    run = subprocess.run([sys.executable, str(script), str(toml), str(tmp_path / "run"),
                          str(out), "--refine-affine", "3"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "step 2" in run.stdout and "'refine_affine': 3" in run.stdout
    exported = load_checkpoint(out)
    for key, value in trainer.task.model.state_dict().items():
        assert torch.equal(value, exported["affine"].state_dict()[key]), key
    assert load_models("affine", [out]).refine_affine == 3
    missing = tmp_path / "none.pt"
    run = subprocess.run([sys.executable, str(script), str(toml), str(tmp_path / "empty"),
                          str(missing)], capture_output=True, text=True)
    assert run.returncode == 2 and "no checkpoint.pt" in run.stderr
    assert not missing.exists()
