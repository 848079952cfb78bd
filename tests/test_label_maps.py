"""Training on real subjects' label maps (``train --label-maps``): reading and refusing
maps, the affine normalisation between subjects, inter-subject pairs, skull on/off, and
the supervised terms (distance to the true affine, end-point error to the true warp).

The label maps are made here: small ellipsoid "heads" with FreeSurfer brain labels, CSF
and head tissues, each subject moved by its own affine and bent a little.
"""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
import torch

from synthmorph_nipype.cli.main import main
from synthmorph_nipype.errors import InputError
from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint
from synthmorph_nipype.ops.grid import apply_affine, voxel_grid
from synthmorph_nipype.ops.sampling import sample_linear
from synthmorph_nipype.synthesis.generator import SynthConfig, sample_pair
from synthmorph_nipype.synthesis.label_maps import (
    BRAIN_LABELS,
    align,
    fit_affine,
    label_map_files,
    loss_labels,
    read_label_map,
)
from synthmorph_nipype.training.config import TrainConfig
from synthmorph_nipype.training.data import LabelSource, subject_on_grid
from synthmorph_nipype.training.losses import one_hot, soft_dice
from synthmorph_nipype.training.tasks import AffineTask, DeformTask, map_distance
from synthmorph_nipype.training.trainer import Trainer, make_pair, true_displacement

HEAD = (24, 507, 515)  # CSF, skull-like, scalp-like
TINY_AFFINE = {"num_feat": 16, "enc_nf": [8, 8, 8], "add_nf": [8]}
TINY_UNET = {"hyp_units": [4, 4], "enc_nf": [4, 4, 4, 4], "dec_nf": [4, 4, 4, 4],
             "add_nf": [4]}


def head_labels(shape=(40, 44, 40), bend: float = 0.0, seed: int = 0) -> np.ndarray:
    """An ellipsoid head: scalp, skull and CSF shells around a brain whose cortex is split
    into octants (eight FreeSurfer labels), with left and right white matter (2/41) and
    ventricles (4/43)."""
    rng = np.random.default_rng(seed)
    c = (np.array(shape) - 1) / 2
    ijk = np.indices(shape, dtype=np.float64)
    x, y, z = ((ijk[a] - c[a]) / (shape[a] / 2) for a in range(3))
    y = y + bend * np.sin(3 * x + rng.uniform(0, 6))  # per-subject anatomy
    r = np.sqrt(x**2 + y**2 + z**2)
    lab = np.zeros(shape, np.int16)
    lab[r < 0.95], lab[r < 0.85], lab[r < 0.78] = 515, 507, 24
    octant = (x < 0).astype(int) * 4 + (y < 0) * 2 + (z < 0)
    cortex = np.array([3, 42, 10, 49, 11, 50, 12, 51])[octant]
    lab[r < 0.7] = cortex[r < 0.7]
    left = x < 0
    lab[r < 0.5] = np.where(left, 2, 41)[r < 0.5]
    vent = (r < 0.22) & (np.abs(y) < 0.3)
    lab[vent] = np.where(left, 4, 43)[vent]
    return lab


def subject_affine(shift, angle_deg: float, scale: float) -> np.ndarray:
    """A 3 mm LIA-ish grid, rotated about the last axis, scaled and shifted."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rot @ np.diag([-3.0, 3.0, 3.0]) * scale
    out[:3, 3] = shift
    return out


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory):
    """Three subjects' whole-head maps, each on its own grid and in its own position."""
    root = tmp_path_factory.mktemp("label_maps")
    placements = (((60.0, -50.0, -40.0), 0.0, 1.0), ((70.0, -40.0, -60.0), 12.0, 1.08),
                  ((50.0, -70.0, -50.0), -9.0, 0.93))
    for n, (shift, angle, scale) in enumerate(placements):
        lab = head_labels(bend=0.08 * n, seed=n)
        nb.save(nb.Nifti1Image(lab, subject_affine(shift, angle, scale)),
                root / f"sub-{n:02d}_labels.nii.gz")
    (root / "notes.txt").write_text("not a map")
    return root


def test_reading_label_maps_and_refusing_others(label_dir, tmp_path):
    files = label_map_files(label_dir)
    assert [f.name for f in files] == [f"sub-{n:02d}_labels.nii.gz" for n in range(3)]
    m = read_label_map(files[0])
    assert m.labels.dtype == np.int32 and m.head_labels == HEAD
    assert loss_labels([m]) == (2, 3, 4, 10, 11, 12, 41, 42, 43, 49, 50, 51)
    bad = tmp_path / "float.nii.gz"
    nb.save(nb.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), bad)
    with pytest.raises(InputError, match=r"float\.nii\.gz: not a label map \(non-integer"):
        read_label_map(bad)
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), bad)
    with pytest.raises(InputError, match=r"label map is 4-D with shape \(4, 4, 4, 2\)"):
        read_label_map(bad)
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), bad)
    with pytest.raises(InputError, match="empty"):
        read_label_map(bad)
    with pytest.raises(InputError, match="holds no label maps"):
        label_map_files(tmp_path / "..")  # a folder without maps (pytest's tmp root)
    with pytest.raises(InputError, match="nope: not found"):
        label_map_files(tmp_path / "nope")


def test_config_expands_folders_and_patterns(label_dir):
    cfg = TrainConfig(model="affine", label_maps=[str(label_dir / "sub-0[01]_*.nii.gz"),
                                                  str(label_dir / "sub-02_labels.nii.gz")])
    assert [f.name for f in cfg.label_map_files()] == [
        "sub-00_labels.nii.gz", "sub-01_labels.nii.gz", "sub-02_labels.nii.gz"]
    cfg = TrainConfig(model="affine", label_maps=str(label_dir / "sub-9*"))
    with pytest.raises(InputError, match="matches no label maps"):
        cfg.label_map_files()


def test_fit_affine_recovers_a_known_map():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(20, 3)) * 30
    mat = np.eye(4)
    mat[:3, :3] = np.eye(3) + 0.1 * rng.normal(size=(3, 3))
    mat[:3, 3] = [5, -7, 2]
    assert np.allclose(fit_affine(pts, pts @ mat[:3, :3].T + mat[:3, 3]), mat)


def test_subjects_are_normalised_to_one_reference(label_dir):
    """Every subject lies in its own place and size; after the alignment the brains of
    different subjects overlap on the training grid as well as the anatomy allows, far
    better than on their own grids placed in the middle."""
    maps = [read_label_map(f) for f in label_map_files(label_dir)]
    align(maps)
    shape, vox = (32,) * 3, 4.0
    lookup = torch.zeros(600, dtype=torch.long)
    lookup[list(BRAIN_LABELS)] = 1  # the whole brain
    placed = [one_hot(lookup[subject_on_grid(m, shape, vox)][None], 2) for m in maps]
    aligned = [float(soft_dice(placed[0], p)) for p in placed[1:]]
    assert min(aligned) > 0.9
    # the same subject moved differently gives the same placement: the fit is affine-exact
    twin = read_label_map(label_map_files(label_dir)[0])
    twin.affine = subject_affine((10.0, 20.0, -30.0), 25.0, 1.1)
    align([*maps, twin])
    a = subject_on_grid(maps[0], shape, vox)
    b = subject_on_grid(twin, shape, vox)
    assert float((a == b).float().mean()) > 0.97


def test_inter_subject_pairs_skull_on_off_and_brain_only_losses(label_dir):
    maps = [read_label_map(f) for f in label_map_files(label_dir)]
    src = LabelSource((32,) * 3, 4.0, shapes_prob=0.0, head_prob=1.0, label_maps=maps,
                      inter_subject_prob=0.5)
    gen = torch.Generator().manual_seed(0)
    draws = [src.draw(gen) for _ in range(40)]
    inter = [d for d in draws if d.labels_2 is not None]
    assert 8 < len(inter) < 32  # about half are pairs of two subjects
    assert all(not torch.equal(d.labels, d.labels_2) for d in inter)
    d = draws[0]
    assert set(d.skull_labels) == set(HEAD)
    # the losses see the twelve brain labels, numbered 1..12, and nothing of the head
    assert d.loss_labels[list(HEAD)].tolist() == [0, 0, 0]
    brain = [2, 3, 4, 10, 11, 12, 41, 42, 43, 49, 50, 51]
    assert sorted(d.loss_labels[brain].tolist()) == list(range(1, 13))
    # skull on/off per image: stripped images lose every head label, kept ones keep them
    cfg = SynthConfig.identity(voxel_size=4.0, skull_labels=d.skull_labels, skull_prob=0.5)
    seen = set()
    for _ in range(12):
        out = sample_pair(d.labels, cfg, gen)
        for k in (1, 2):
            has_head = bool(torch.isin(out[f"labels_{k}"], torch.tensor(HEAD)).any())
            seen.add(has_head)
            assert bool(torch.isin(out[f"labels_{k}"], torch.tensor([2, 41])).any())
    assert seen == {True, False}
    # a source with head_prob 0 never shows a head
    bare = LabelSource((32,) * 3, 4.0, shapes_prob=0.0, head_prob=0.0, label_maps=maps)
    lm = bare.draw(gen)
    assert not bool(torch.isin(lm.labels, torch.tensor(HEAD)).any())


def test_true_displacement_maps_fixed_points_onto_the_same_anatomy():
    """For a pair made from one map, the moving image shows at ``x + u(x)`` the anatomy
    the fixed image shows at ``x``: both points land on the same source point."""
    cfg = SynthConfig(voxel_size=4.0, warp_std_mm=4.0, shift_mm=10, rotate_deg=10,
                      flip_prob=0.0, crop_prob=0.0)
    labels = torch.zeros((1, 32, 32, 32), dtype=torch.long)
    labels[:, 8:24, 8:24, 8:24] = 1
    out = sample_pair(labels, cfg, torch.Generator().manual_seed(0), inverse=True)
    u = true_displacement(out["affine_1"][0], out["affine_2"][0], out["inv_disp_1"][0],
                          out["disp_2"][0])
    grid = voxel_grid((32,) * 3)
    fixed_src = apply_affine(out["affine_2"][0], grid + out["disp_2"][0])
    y = grid + u
    moving_src = apply_affine(out["affine_1"][0],
                              y + sample_linear(out["disp_1"][0], y, boundary="clamp"))
    inside = ((y >= 0) & (y <= 31)).all(-1)
    err = (moving_src - fixed_src).norm(dim=-1)[inside]
    assert float(u.norm(dim=-1).mean()) > 2.0  # a real warp, not the identity
    assert float(err.mean()) < 0.1
    # the affine part alone is off by the warps
    rel = torch.linalg.inv(out["affine_1"][0].double()) @ out["affine_2"][0].double()
    aff_only = apply_affine(out["affine_1"][0], apply_affine(rel.float(), grid))
    assert float((aff_only - fixed_src).norm(dim=-1)[inside].mean()) > 0.5


def test_supervised_terms_are_zero_at_the_truth_and_pull_towards_it(label_dir):
    maps = [read_label_map(f) for f in label_map_files(label_dir)]
    src = LabelSource((32,) * 3, 4.0, shapes_prob=0.0, head_prob=1.0, label_maps=maps,
                      inter_subject_prob=0.0)
    synth = SynthConfig(voxel_size=4.0, warp_std_mm=3.0, shift_mm=8.0, rotate_deg=8.0,
                        flip_prob=0.0)
    pair = make_pair(src, synth, torch.Generator().manual_seed(2), torch.device("cpu"),
                     displacement=True)
    assert pair.disp_truth is not None and pair.truth is not None
    truth = pair.truth.clone().requires_grad_(True)
    assert float(map_distance(truth, pair.truth, pair.onehot_2).detach()) < 1e-4
    off = pair.truth.clone()
    off[:3, 3] += torch.tensor([1.0, -2.0, 2.0], dtype=off.dtype)
    off.requires_grad_(True)
    dist = map_distance(off, pair.truth, pair.onehot_2)
    assert abs(float(dist) - 3.0) < 1e-3  # a pure shift of 3 voxels
    dist.backward()
    assert torch.allclose(off.grad[:3, 3], torch.tensor([1.0, -2.0, 2.0]).double() / 3,
                          atol=1e-3)  # the gradient points along the error
    # inter-subject pairs have no dense truth
    src.inter_subject_prob = 1.0
    inter = make_pair(src, synth, torch.Generator().manual_seed(3), torch.device("cpu"),
                      displacement=True)
    assert inter.disp_truth is None and inter.truth is not None


def test_supervised_detector_loss_learns_faster_than_overlap_alone(label_dir):
    """On a fixed pair, the supervised distance term brings the detector closer to the
    true map in the same number of steps than label overlap alone."""
    maps = [read_label_map(f) for f in label_map_files(label_dir)]
    src = LabelSource((32,) * 3, 4.0, shapes_prob=0.0, head_prob=1.0, label_maps=maps,
                      inter_subject_prob=0.0)
    synth = SynthConfig.identity(voxel_size=4.0, shift_mm=6.0, rotate_deg=6.0)
    pair = make_pair(src, synth, torch.Generator().manual_seed(5), torch.device("cpu"))
    errors = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        config = TrainConfig(model="affine", widths=TINY_AFFINE).model_config()
        task = AffineTask(config, supervised_weight=weight)
        opt = torch.optim.Adam(task.model.parameters(), lr=3e-3)
        for _ in range(40):
            loss, terms = task.loss(pair, torch.Generator())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert ("dist" in terms) == bool(weight)
        errors[weight] = task.evaluate(pair)["error_vox"]
    assert errors[1.0] < 0.7 * errors[0.0]


def test_deform_task_reports_end_point_error_every_step(label_dir):
    maps = [read_label_map(f) for f in label_map_files(label_dir)]
    src = LabelSource((32,) * 3, 4.0, shapes_prob=0.0, head_prob=1.0, label_maps=maps,
                      inter_subject_prob=0.5)
    cfg = TrainConfig(model="joint", widths=TINY_UNET, grid=32, voxel_mm=4.0)
    task = DeformTask(cfg.model_config(), similarity="dice", supervised_weight=0.5)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(6):
        pair = make_pair(src, SynthConfig(voxel_size=4.0, flip_prob=0.0), gen,
                         torch.device("cpu"), displacement=True)
        loss, terms = task.loss(pair, gen)
        loss.backward()
        seen.append(np.isnan(terms["epe"]) == (pair.disp_truth is None))
        if pair.disp_truth is not None:  # a near-identity network: about the identity's
            assert terms["epe"] == pytest.approx(terms["epe_identity"], rel=0.05)
            assert terms["epe_identity"] > 0.1
    assert all(seen)


def test_train_command_on_label_maps_continues_from_weights(label_dir, tmp_path, capsys):
    """``synthmorph train --label-maps`` on tiny maps, started from a weights file: the
    run starts from those weights (its first loss is theirs), keeps their refinement
    advice, and exports a model the engine loads."""
    cfg = TrainConfig(model="affine", widths=TINY_AFFINE, grid=32, voxel_mm=4.0)
    start = Trainer(cfg, tmp_path / "unused").task.model
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.01)
    weights = tmp_path / "start.pt"
    save_checkpoint(weights, meta={"refine_affine": 7}, affine=start)
    conf = tmp_path / "c.json"
    conf.write_text(
        '{"model": "affine", "grid": 32, "voxel_mm": 4.0, "steps": 3, "val_pairs": 1,'
        ' "val_every": 3, "threads": 1, "amp": false, "shapes_prob": 0.0, "head_prob": 1.0,'
        ' "supervised_weight": 0.1, "widths": {"num_feat": 16, "enc_nf": [8, 8, 8],'
        ' "add_nf": [8]}}')
    out = tmp_path / "run"
    main(["train", "--config", str(conf), "--out", str(out), "--label-maps", str(label_dir),
          "--init-weights", str(weights), "-q"])
    assert "trained affine for 3 steps" in capsys.readouterr().out
    rows = (out / "train.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["step", "loss", "sim", "dist"] and len(rows) == 4
    ck = load_checkpoint(out / "model.pt")
    assert ck["meta"]["refine_affine"] == 7
    moved = sum(float((a - b).abs().sum()) for a, b in
                zip(ck["affine"].parameters(), start.parameters(), strict=True))
    assert 0 < moved < 5  # three small steps away from the start, not a fresh network
    code = main(["train", "--config", str(conf), "--out", str(tmp_path / "bad"),
                 "--label-maps", str(tmp_path / "missing")])
    assert code != 0
    assert "missing: not found" in capsys.readouterr().err


def test_validation_reports_the_brains_apart_from_the_shapes(label_dir, tmp_path):
    """With random shapes in the mix, validation gives the brain pairs' own means next to
    the overall ones, and the log gains those columns (a resumed run rewrites the CSV
    header under the union of the columns)."""
    cfg = TrainConfig(model="joint", widths=TINY_UNET, grid=32, voxel_mm=4.0, val_pairs=8,
                      shapes_prob=0.5, label_maps=[str(label_dir)], threads=1, amp=False,
                      seed=3)
    trainer = Trainer(cfg, tmp_path / "run", log=None)
    pairs = trainer.validation_pairs()
    sources = {p.source for p in pairs}
    assert "shapes" in sources and sources - {"shapes"}
    rows = [trainer.task.evaluate(p) for p in pairs]
    brain = [r["dice_before"] for r, p in zip(rows, pairs, strict=True) if p.source != "shapes"]
    metrics = trainer.validate()
    assert metrics["dice_before_brain"] == pytest.approx(sum(brain) / len(brain))
    assert metrics["dice_before"] == pytest.approx(sum(r["dice_before"] for r in rows) / 8)
    assert metrics["dice_before_brain"] != pytest.approx(metrics["dice_before"])
    # a log written before the brain columns existed gains them, earlier rows blank
    from synthmorph_nipype.training.trainer import _append

    log = tmp_path / "val.csv"
    _append(log, {"step": 500, "dice": 0.5})
    _append(log, {"step": 1000, "dice": 0.6, "dice_brain": 0.4})
    assert log.read_text().splitlines() == ["step,dice,dice_brain", "500,0.5,", "1000,0.6,0.4"]
