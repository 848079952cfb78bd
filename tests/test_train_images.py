"""VoxelMorph-style training on a user's own images: fine-tuning a joint model with an
image similarity improves that similarity on the pairs it sees, and the command line
exports a model the engine loads."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest
import torch
from scipy import ndimage

from synthmorph_nipype.cli.main import main
from synthmorph_nipype.errors import InputError
from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint
from synthmorph_nipype.training.config import TrainConfig
from synthmorph_nipype.training.images import image_files
from synthmorph_nipype.training.trainer import Trainer


@pytest.fixture(scope="module")
def image_dir(template, tmp_path_factory):
    """Three 'subjects': the 2 mm template under smooth random warps and shifts."""
    root = tmp_path_factory.mktemp("images")
    img = nb.load(template)
    data = np.asarray(img.dataobj, dtype=np.float32)
    rng = np.random.default_rng(0)
    for k in range(3):
        disp = [ndimage.gaussian_filter(rng.standard_normal(data.shape), 6) * 40
                for _ in range(3)]
        grid = np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij")
        warped = ndimage.map_coordinates(data, [g + d for g, d in zip(grid, disp, strict=True)],
                                         order=1)
        affine = img.affine.copy()
        affine[:3, 3] += rng.uniform(-4, 4, 3)
        sub = root / f"sub-{k}" / "anat"
        sub.mkdir(parents=True)
        nb.save(nb.Nifti1Image(warped, affine), sub / f"sub-{k}_T1w.nii.gz")
    return root


def config(image_dir, weights, **changes) -> TrainConfig:
    base = dict(model="joint", objective="similarity", images=str(image_dir),
                init_weights=str(weights), steps=30, lr=3e-3, seed=0, val_pairs=3,
                val_every=30, ckpt_every=30, threads=1, amp=False, similarity="ncc")
    base.update(changes)
    return TrainConfig(**base)


def test_fine_tuning_improves_the_image_similarity(image_dir, tiny_weights, tmp_path):
    # a starting model that recommends test-time refinement
    start = load_checkpoint(tiny_weights["joint"])
    advice = {"refine_affine": 3, "refine": 7, "refine_similarity": "mind",
              "refine_lambda": 0.8}
    save_checkpoint(tmp_path / "start.pt", meta={**start["meta"], **advice},
                    affine=start["affine"], deform=start["deform"])
    # trained on 48^3 cubes cut from the 96^3 pairs (validated on whole pairs)
    trainer = Trainer(config(image_dir, tmp_path / "start.pt", crop=48), tmp_path / "run")
    before = trainer.validate()
    after = trainer.run(progress=False)
    assert after["similarity"] < before["similarity"] - 0.005, (before, after)
    assert after["similarity"] < after["similarity_before"]
    assert after["folding_pct"] < 1.0
    model = load_checkpoint(tmp_path / "run" / "model.pt")
    assert model["affine"] is not None and model["deform"] is not None  # detector kept
    assert {k: model["meta"].get(k) for k in advice} == advice  # and the advice with it


def test_train_images_from_the_command_line(image_dir, tiny_weights, template, tmp_path,
                                            capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"val_pairs": 2, "val_every": 4, "ckpt_every": 4,
                               "amp": False, "lr": 1e-3}))
    out = tmp_path / "ft"
    code = main(["train", "--model", "joint", "--objective", "similarity", "--images",
                 str(image_dir), "--init-weights", str(tiny_weights["joint"]), "--similarity",
                 "mind", "--config", str(cfg), "--out", str(out), "--steps", "4", "-j", "1",
                 "-q"])
    assert code == 0
    rows = (out / "val.csv").read_text().splitlines()
    assert rows[0].split(",")[1:3] == ["similarity", "similarity_before"]
    assert main(["register", "-w", str(out / "model.pt"), "-e", "192", "-j", "1",
                 str(template), str(template), "-t", str(tmp_path / "x.h5")]) == 0
    assert main(["train", "--objective", "similarity", "--images", str(tmp_path / "none"),
                 "--out", str(tmp_path / "bad"), "-q"]) == 1
    assert "not found" in capsys.readouterr().err


def test_image_lists_need_two_images(image_dir, tmp_path):
    assert len(image_files(image_dir)) == 3
    one = tmp_path / "one.txt"
    one.write_text(str(next(image_dir.rglob("*.nii.gz"))) + "\n")
    with pytest.raises(InputError, match="at least 2"):
        image_files(one)
    with pytest.raises(ValueError, match="needs images"):
        TrainConfig(model="joint", objective="similarity")
    with pytest.raises(ValueError, match="synthetic or similarity"):
        TrainConfig(model="joint", objective="images", images="x")
    with pytest.raises(ValueError, match="2 mm grid"):
        TrainConfig(model="joint", objective="similarity", images="x", voxel_mm=4.0)
    torch.manual_seed(0)


def test_fine_tuning_starts_from_freesurfer_keras_weights(image_dir, tiny_weights, tmp_path):
    from synthmorph_nipype.models.keras import load_keras

    from .test_models import def_arrays, write_deform_file

    dense, hyper = def_arrays()
    h5 = tmp_path / "deform.h5"
    write_deform_file(h5, dense, hyper)
    official = load_keras(h5, lam=None).deform
    # the Keras deformable weights with our detector (.pt) for the alignment
    trainer = Trainer(config(image_dir, tiny_weights["joint"], steps=1,
                             init_weights=[str(h5), str(tiny_weights["joint"])]),
                      tmp_path / "run")
    mine = trainer.task.model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in official.state_dict().items())
    assert trainer.detector is not None
    # a spatially varying model can start from them too: the velocity channels agree
    svr = Trainer(config(image_dir, tiny_weights["joint"], steps=1, init_weights=[str(h5)],
                         spatial_lambda=True), tmp_path / "svr")
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(svr.task.model(x)[:, :3], official(x, 0.5), rtol=1e-4,
                              atol=1e-4)
    with pytest.raises(ValueError, match="holds no hypernetwork U-Net"):
        Trainer(config(image_dir, tiny_weights["affine"]), tmp_path / "bad")
