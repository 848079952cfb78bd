"""Test-time refinement: the optimisation recovers a known smooth warp on small volumes,
and ``--refine`` reaches it from the command line and the Nipype interface."""

from __future__ import annotations

import math

import nibabel as nb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthmorph_nipype.cli.main import main
from synthmorph_nipype.engine.refine import content_box, refine_matrix, refine_svf
from synthmorph_nipype.engine.register import register
from synthmorph_nipype.engine.weights import load_models
from synthmorph_nipype.errors import SynthMorphError, WeightsError
from synthmorph_nipype.interfaces import SynthMorphRegister
from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint
from synthmorph_nipype.ops.grid import voxel_grid
from synthmorph_nipype.ops.integrate import integrate_svf
from synthmorph_nipype.ops.regularity import grad_sq
from synthmorph_nipype.ops.sampling import sample_linear


def smooth(shape, seed, passes=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=gen)
    for _ in range(passes):
        x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x[0, 0]


@pytest.mark.parametrize("similarity,lam,warp_features,exact", [
    ("ncc", 0.3, False, True), ("mse", 0.05, False, True), ("mind", 0.3, False, True),
    ("mind", 0.3, True, True), ("mind", 0.3, False, False), ("ncc", 0.3, False, False)])
def test_refinement_recovers_a_smooth_warp(similarity, lam, warp_features, exact):
    n = 24
    fixed = smooth((n, n, n), 0)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    i = torch.arange(n, dtype=torch.float32)
    true = torch.zeros(n, n, n, 3)  # about a voxel, varying along the other axes
    true[..., 0] = 1.5 * torch.sin(2 * math.pi * i / n)[None, :, None]
    true[..., 1] = torch.cos(2 * math.pi * i / n)[None, None, :]
    # moving sampled at grid - true: pulled back at grid + true, it is fixed again
    moving = sample_linear(fixed, voxel_grid((n, n, n)) - true)
    svf, history = refine_svf(torch.zeros(n, n, n, 3), moving, fixed, iterations=60,
                              lam=lam, similarity=similarity, lr=0.1,
                              warp_features=warp_features, exact_gradient=exact)
    assert history[-1] < history[0]
    inner = (slice(4, -4),) * 3
    before = float(true[inner].norm(dim=-1).mean())
    after = float((integrate_svf(svf, 7) - true)[inner].norm(dim=-1).mean())
    assert after < 0.6 * before, (before, after)


def test_mutual_information_refines_across_a_folded_contrast():
    """The moving image's intensities folded about a grey (|v - 0.45|: no edge-preserving
    map, so MIND's descriptors change): the refinement on MI recovers the warp best, MIND
    plus MI better than MIND alone."""
    n = 24
    fixed = smooth((n, n, n), 0)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    i = torch.arange(n, dtype=torch.float32)
    true = torch.zeros(n, n, n, 3)
    true[..., 0] = 1.5 * torch.sin(2 * math.pi * i / n)[None, :, None]
    true[..., 1] = torch.cos(2 * math.pi * i / n)[None, None, :]
    moving = (sample_linear(fixed, voxel_grid((n, n, n)) - true) - 0.45).abs()
    inner = (slice(4, -4),) * 3
    before = float(true[inner].norm(dim=-1).mean())
    left = {}
    for similarity, lam in (("mi", 0.9), ("mind+mi", 0.3), ("mind", 0.3)):
        svf, history = refine_svf(torch.zeros(n, n, n, 3), moving, fixed, iterations=60,
                                  lam=lam, similarity=similarity, lr=0.1,
                                  exact_gradient=False)
        assert history[-1] < history[0]
        err = float((integrate_svf(svf, 7) - true)[inner].norm(dim=-1).mean())
        left[similarity] = err / before
    assert left["mi"] < 0.4 and left["mind+mi"] < left["mind"], left


def test_a_weight_map_lets_the_field_bend_where_it_is_low():
    # the same warp everywhere; a spatially varying model's map low in one half: the
    # refined field bends more there (and a map of ones is Grad-l2)
    n = 24
    fixed = smooth((n, n, n), 1)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    i = torch.arange(n, dtype=torch.float32)
    true = torch.zeros(n, n, n, 3)
    true[..., 1] = 1.5 * torch.sin(2 * math.pi * i / n)[None, None, :]
    moving = sample_linear(fixed, voxel_grid((n, n, n)) - true)
    weight = torch.ones(n, n, n)
    weight[: n // 2] = 0.05
    kwargs = dict(iterations=60, lam=0.7, similarity="ncc", lr=0.1)
    svf, _ = refine_svf(torch.zeros(n, n, n, 3), moving, fixed, weight=weight, **kwargs)
    bend = grad_sq(integrate_svf(svf, 7).permute(3, 0, 1, 2)[None])[0, 0]
    low, high = float(bend[2:n // 2 - 2].mean()), float(bend[n // 2 + 2:-2].mean())
    assert low > 2 * high, (low, high)
    plain, history = refine_svf(torch.zeros(n, n, n, 3), moving, fixed, **kwargs)
    ones, history_1 = refine_svf(torch.zeros(n, n, n, 3), moving, fixed,
                                 weight=torch.ones(n, n, n), **kwargs)
    assert history_1[0] == pytest.approx(history[0])
    inner = (slice(3, -3),) * 3  # the two penalties differ at the far borders only
    diff = float((ones - plain)[inner].abs().mean()) / float(plain[inner].abs().mean())
    assert diff < 0.05, diff
    # both halves bend alike without the map
    bend = grad_sq(integrate_svf(plain, 7).permute(3, 0, 1, 2)[None])[0, 0]
    low, high = float(bend[2:n // 2 - 2].mean()), float(bend[n // 2 + 2:-2].mean())
    assert abs(low - high) < 0.5 * high, (low, high)


def test_pooled_refinement_recovers_a_smooth_warp_and_keeps_the_fine_field():
    n = 48
    fixed = smooth((n, n, n), 3, passes=3)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    i = torch.arange(n, dtype=torch.float32)
    true = torch.zeros(n, n, n, 3)
    true[..., 0] = 2.0 * torch.sin(2 * math.pi * i / n)[None, :, None]
    true[..., 2] = 1.5 * torch.cos(2 * math.pi * i / n)[:, None, None]
    moving = sample_linear(fixed, voxel_grid((n, n, n)) - true)
    # a start with fine detail the coarse grid cannot hold (a checkerboard along i, plus
    # noise): the coarse refinement must add its correction to it, not replace it
    nyquist = (-1.0) ** i[:, None, None, None]
    start = 0.05 * nyquist.expand(n, n, n, 3).clone()
    start += 0.05 * torch.randn(n, n, n, 3, generator=torch.Generator().manual_seed(0))
    svf, history = refine_svf(start, moving, fixed, iterations=60, lam=0.3, lr=0.1, pool=2)
    assert history[-1] < history[0]
    assert abs(float(((svf - start) * nyquist).mean())) < 0.01
    assert float((svf * nyquist).mean()) == pytest.approx(0.05, abs=0.012)
    inner = (slice(6, -6),) * 3
    before = float(true[inner].norm(dim=-1).mean())
    after = float((integrate_svf(svf, 7) - true)[inner].norm(dim=-1).mean())
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("masked", [False, True])
def test_refinement_cropped_to_the_content_reaches_the_same_field(masked):
    """Content (or a mask) in the middle of a larger grid: the refinement of its box
    (grown by the margin) gives the field the whole grid's refinement gives where the
    content is, leaves the start untouched outside the box, and joins it without a
    jump across the margin."""
    n, lo, hi, margin = 32, 8, 24, 4  # (margin 2 around a mask: 95 % off, image
    # content outside the box missing from the similarity's neighbourhoods; 4: 2 %)
    blob = smooth((hi - lo,) * 3, 5)
    fixed = torch.zeros(n, n, n)
    fixed[lo:hi, lo:hi, lo:hi] = (blob - blob.min()) / (blob.max() - blob.min())
    i = torch.arange(n, dtype=torch.float32)
    true = torch.zeros(n, n, n, 3)
    true[..., 0] = 1.2 * torch.sin(2 * math.pi * i / 16)[None, :, None]
    moving = sample_linear(fixed, voxel_grid((n, n, n)) - true)
    mask = None
    if masked:  # a mask inside the content: only it counts (and sets the box)
        mask = torch.zeros(n, n, n)
        mask[lo + 2:hi - 2, lo + 2:hi - 2, lo + 2:hi - 2] = 1
    box = content_box((moving, fixed), (mask, mask), margin)
    edge = lo + 2 if masked else lo
    assert box is not None and box[1].start == edge - margin
    assert content_box((fixed, fixed), (None, None), n) is None  # the whole grid
    assert content_box((0 * fixed, 0 * fixed), (None, None), 2) is None  # nothing
    start = 0.1 * torch.randn(n, n, n, 3, generator=torch.Generator().manual_seed(1))
    kwargs = dict(iterations=30, lam=0.3, lr=0.3, similarity="ncc", mask_1=mask, mask_2=mask)
    whole, _ = refine_svf(start, moving, fixed, **kwargs)
    cropped, _ = refine_svf(start, moving, fixed, crop_margin=margin, **kwargs)
    outside = torch.ones(n, n, n, dtype=torch.bool)
    outside[box] = False
    assert torch.equal(cropped[outside], start[outside])
    inner = (slice(edge + 1, n - edge - 1),) * 3
    change = (whole - start)[inner]
    diff = float(((cropped - start)[inner] - change).norm(dim=-1).mean())
    assert float(change.norm(dim=-1).mean()) > 0.3  # it did refine there
    assert diff < 0.1 * float(change.norm(dim=-1).mean()), diff
    # the correction fades across the margin: small on the box's outer faces
    correction = (cropped - start).norm(dim=-1)
    faces = torch.cat([correction[box[0].start, box[1], box[2]].ravel(),
                       correction[box[0], box[1].stop - 1, box[2]].ravel()])
    assert float(faces.max()) < 0.3 * float(correction[inner].max())


def test_refine_from_the_command_line(nipype_pair, tmp_path, capsys):
    base = ["register", "-m", "joint", "-e", "192", "-j", "1", "-w",
            str(nipype_pair["weights"]), str(nipype_pair["moving"]), str(nipype_pair["fixed"])]
    assert main(base + ["-o", str(tmp_path / "plain.nii.gz")]) == 0
    assert main(base + ["--refine", "3", "--refine-similarity", "mind",
                        "-o", str(tmp_path / "refined.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "refinement (mind) loss" in out and "in 3 steps at 4 mm" in out
    assert ", " in out and "in 1 at 2 mm (lambda" in out  # then a quarter at 2 mm
    assert main(base + ["--refine", "3", "--refine-similarity", "mind+mi",
                        "-o", str(tmp_path / "mindmi.nii.gz")]) == 0
    assert "refinement (mind+mi) loss" in capsys.readouterr().out
    mindmi = nb.load(tmp_path / "mindmi.nii.gz").get_fdata()
    plain = nb.load(tmp_path / "plain.nii.gz").get_fdata()
    refined = nb.load(tmp_path / "refined.nii.gz").get_fdata()
    assert not np.allclose(plain, refined) and not np.allclose(mindmi, refined)
    assert main(base[:2] + ["affine"] + base[3:] + ["--refine", "2", "-t",
                                                    str(tmp_path / "a.txt")]) == 1
    assert "--refine applies to the deformable modes" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists()


def test_refine_lambda_smooths_and_comes_from_the_weights(nipype_pair, tmp_path, capsys):
    """The refinement's smoothness weight: the weights' ``refine_lambda`` is the default
    (recorded in the result), an explicit one wins, a larger one gives a smoother field,
    and the command line passes it through (and rejects one outside (0, 1))."""
    model = load_checkpoint(nipype_pair["weights"])
    advised = tmp_path / "advised.pt"
    save_checkpoint(advised, meta={**model["meta"], "refine_lambda": 0.9},
                    affine=model["affine"], deform=model["deform"])
    models = load_models("joint", [advised])
    assert models.refine_lambda == 0.9
    assert load_models("joint", [nipype_pair["weights"]]).refine_lambda is None
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, meta={**model["meta"], "refine_lambda": 1.5},
                    affine=model["affine"], deform=model["deform"])
    with pytest.raises(WeightsError, match="wrong.pt: its refine_lambda 1.5"):
        load_models("joint", [wrong])
    moving, fixed = nb.load(nipype_pair["moving"]), nb.load(nipype_pair["fixed"])

    def roughness(**kwargs):  # of the whole field on the fixed grid
        result = register(moving, fixed, models, mode="joint", extent=192, refine=20,
                          refine_affine=0, similarity="ncc", outputs=("forward",), **kwargs)
        field = result.forward.transforms[1].field
        return result.info["refine_lambda"], float(sum(
            (np.diff(field, axis=a) ** 2).mean() for a in range(3)))

    lam_default, rough_default = roughness()
    lam_low, rough_low = roughness(refine_lambda=0.05)
    assert (lam_default, lam_low) == (0.9, 0.05)
    # the tiny random network's field is rough: the refinement smooths it more with 0.9
    assert rough_default < 0.97 * rough_low, (rough_default, rough_low)
    assert register(moving, fixed, models, mode="joint", extent=192, refine=1,
                    refine_affine=0, lam=0.05, outputs=("forward",)
                    ).info["refine_lambda"] == 0.9  # -r does not override the weights' advice
    with pytest.raises(SynthMorphError, match="smoothness weight"):
        register(moving, fixed, models, mode="joint", extent=192, refine=1,
                 refine_lambda=1.0)
    base = ["register", "-m", "joint", "-e", "192", "-j", "1", "-w", str(advised),
            "--refine", "2", str(nipype_pair["moving"]), str(nipype_pair["fixed"]),
            "-t", str(tmp_path / "f.h5")]
    assert main(base) == 0
    assert "in 2 steps at 4 mm, " in (out := capsys.readouterr().out) and "(lambda 0.9)" in out
    assert main(base + ["--refine-lambda", "0.3"]) == 0
    assert "in 1 at 2 mm (lambda 0.3)" in capsys.readouterr().out
    (tmp_path / "f.h5").unlink()
    with pytest.raises(SystemExit):
        main(base + ["--refine-lambda", "1.5"])
    assert "--refine-lambda" in capsys.readouterr().err
    assert not (tmp_path / "f.h5").exists()


def test_refine_in_the_interface(nipype_pair):
    reg = SynthMorphRegister(moving_image=str(nipype_pair["moving"]),
                             fixed_image=str(nipype_pair["fixed"]), refine=50,
                             refine_similarity="ncc", refine_lambda=0.8)
    assert "--refine 50" in reg.cmdline and "--refine-similarity ncc" in reg.cmdline
    assert "--refine-lambda 0.8" in reg.cmdline
    assert "--refine" not in SynthMorphRegister(
        moving_image=str(nipype_pair["moving"]), fixed_image=str(nipype_pair["fixed"])).cmdline
    reg.inputs.refine_affine = 0  # off, rather than what the weights recommend
    assert "--refine-affine 0" in reg.cmdline


# ------------------------------------------------------------------- affine refinement

def _rotation_matrix(deg, axis):
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _about_centre(m, n):
    shift = np.eye(4)
    shift[:3, 3] = (n - 1) / 2
    return shift @ m @ np.linalg.inv(shift)


def _affine_pair(rigid: bool, n: int = 64):
    """Image 2: textured ball; image 1: its anatomy under a known affine (image 2 index ->
    image 1 index), in an inverted contrast. Returns both, the truth, a start 3 degrees
    and ~2.8 voxels off it, and the error (voxels, worst corner of a 30^3 cube) of a
    matrix."""
    blobs = smooth((n, n, n), 1, passes=4)
    ball = (voxel_grid((n, n, n)) - (n - 1) / 2).norm(dim=-1) < 22
    image_2 = torch.where(ball, (blobs - blobs.min()) / (blobs.max() - blobs.min()), 0)
    truth = _rotation_matrix(6, 0) @ _rotation_matrix(-4, 2)
    truth[:3, 3] = [2.5, -1.5, 2.0]
    if not rigid:
        truth = truth @ np.diag([1.05, 0.97, 1.0, 1.0])
    truth = _about_centre(truth, n)
    inverse = torch.as_tensor(np.linalg.inv(truth)[:3], dtype=torch.float32)
    pts = voxel_grid((n, n, n)) @ inverse[:, :3].T + inverse[:, 3]
    image_1 = torch.where(sample_linear(ball.float(), pts) > 0.5,
                          1.2 - sample_linear(image_2, pts), 0)
    start = _about_centre(_rotation_matrix(3, 1), n) @ truth
    start[:3, 3] += [1.5, 1.0, -2.0]
    centre = np.array([(n - 1) / 2] * 3 + [1.0])
    corners = centre + np.array([[dx, dy, dz, 0] for dx in (-15, 15) for dy in (-15, 15)
                                 for dz in (-15, 15)])

    def error(m):
        return np.abs((m - truth) @ corners.T)[:3].max()

    return image_1, image_2, truth, start, error


@pytest.mark.parametrize("rigid", [False, True])
def test_matrix_refinement_recovers_a_known_affine_across_contrasts(rigid):
    image_1, image_2, _, start, error = _affine_pair(rigid)
    # pyramid 2x, 1x here: on 64^3 a 4x pooled level (16^3) is too coarse to find anything
    refined, history = refine_matrix(start, image_1, image_2, iterations=60, rigid=rigid,
                                     pools=(2, 1))
    assert len(history) == 120  # 60 steps on each level
    assert np.mean(history[-10:]) < np.mean(history[:10])
    assert error(start) > 2.5 and error(refined) < 0.2, (error(start), error(refined))
    if rigid:  # a rotation and a translation were added to the start, nothing else
        lin = np.linalg.inv(start[:3, :3]) @ refined[:3, :3]
        assert np.allclose(lin @ lin.T, np.eye(3), atol=1e-5)


def test_matrix_refinement_draws_repeatable_points():
    """The compared voxels are random draws: one seed gives one result, another seed a
    different one that finds the answer as well; fewer points per step still do."""
    image_1, image_2, _, start, error = _affine_pair(False, n=48)
    runs = {seed: refine_matrix(start, image_1, image_2, iterations=40, pools=(2, 1),
                                seed=seed)[0] for seed in (0, 0, 1)}
    again, _ = refine_matrix(start, image_1, image_2, iterations=40, pools=(2, 1), seed=0)
    assert np.array_equal(runs[0], again)
    assert not np.array_equal(runs[0], runs[1])
    few, _ = refine_matrix(start, image_1, image_2, iterations=40, pools=(2, 1), points=2048)
    assert max(error(runs[0]), error(runs[1]), error(few)) < 0.35 * error(start), (
        error(start), error(runs[0]), error(runs[1]), error(few))
    # one step count per level: the history has their sum; a count per level is required
    split, history = refine_matrix(start, image_1, image_2, iterations=(50, 20),
                                   pools=(2, 1))
    assert len(history) == 70 and error(split) < 0.35 * error(start)
    with pytest.raises(ValueError, match="2 iteration counts for 3 levels"):
        refine_matrix(start, image_1, image_2, iterations=(5, 5), pools=(4, 2, 1))


def test_matrix_refinement_box_maps_coordinates_exactly():
    """The affine refinement works on the box of each image's content: an image pulled
    into the box equals the box cut from the image pulled onto the whole grid, and a
    point sampled from a box volume reads what the whole volume has there."""
    from synthmorph_nipype.engine.refine import _boxes, _draw, _gather, _pull, _sample_at

    shape = (40, 37, 43)
    image = torch.zeros(1, 1, *shape)
    image[0, 0, 16:23, 13:19, 30:40] = smooth((7, 6, 10), 3)
    box = _boxes(image, None, 2)  # content +- 2 (margin) +- 7 (halo), clipped to the grid
    assert [(b.start, b.stop) for b in box.slices] == [(7, 32), (4, 28), (21, 43)]
    assert [(b.start, b.stop) for b in box.inner] == [(7, 18), (7, 17), (7, 21)]
    angle = 0.2
    matrix = torch.tensor([[math.cos(angle), -math.sin(angle), 0, 0.05],
                           [math.sin(angle), math.cos(angle), 0, -0.1],
                           [0, 0, 1, 0.02], [0, 0, 0, 1]])
    whole, cut = _pull(image, matrix), _pull(image, matrix, box)
    assert torch.allclose(box.crop(whole), cut, atol=1e-5)
    assert float(cut.abs().max()) > 0.1  # the pulled content lies in the box
    candidates = torch.arange(int(np.prod(box.shape)))
    flat, points = _draw(candidates, 500, torch.Generator().manual_seed(0), box)
    # a drawn voxel's flat index (in the box) and its coordinates (on the grid) agree
    assert torch.allclose(_gather(cut, flat), _sample_at(whole, points), atol=1e-5)
    moved = points + 0.01 * torch.randn(points.shape)  # off the voxel centres
    assert torch.allclose(_sample_at(cut, box.local(moved)), _sample_at(whole, moved),
                          atol=1e-5)


def test_matrix_refinement_needs_a_pointwise_similarity():
    """MIND or MSE (compared voxel by voxel); NCC's windows are refused. MSE finds a shift
    between two images of one contrast."""
    _, image_2, _, _, _ = _affine_pair(False, n=48)
    shift = torch.tensor([1.5, -1.0, 1.0])
    image_1 = sample_linear(image_2, voxel_grid(image_2.shape) - shift)
    with pytest.raises(ValueError, match="mind or mse"):
        refine_matrix(np.eye(4), image_1, image_2, iterations=1, similarity="ncc")
    refined, _ = refine_matrix(np.eye(4), image_1, image_2, iterations=40, pools=(2, 1),
                               similarity="mse")
    assert np.abs(refined[:3, 3] - shift.numpy()).max() < 0.3, refined


def _pair_error(chain, fixed_path, rot, shift):
    """Mean distance (mm) over the fixed brain between ``chain``'s affine and the known
    fixed -> moving map of the ``nipype_pair`` fixture."""
    from synthmorph_nipype.ops.rotation import rotation
    from synthmorph_nipype.transforms.base import ImageGrid

    img = nb.load(fixed_path)
    truth = np.eye(4)
    truth[:3, :3], truth[:3, 3] = rotation(rot), shift
    data = np.asarray(img.dataobj)
    pts = ImageGrid.from_image(img).world_points()[data > 0.3 * data.max()][::20]
    est = chain.transforms[0].matrix
    pts_h = np.c_[pts, np.ones(len(pts))]
    return float(np.linalg.norm((pts_h @ (est - truth).T)[:, :3], axis=1).mean())


def test_weights_recommend_affine_refinement(nipype_pair, tmp_path):
    from synthmorph_nipype.engine.register import register
    from synthmorph_nipype.engine.weights import load_models
    from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint

    parts = load_checkpoint(nipype_pair["weights"])
    path = tmp_path / "recommends.pt"
    save_checkpoint(path, affine=parts["affine"], deform=parts["deform"],
                    meta={"refine_affine": 40})
    moving, fixed = nb.load(nipype_pair["moving"]), nb.load(nipype_pair["fixed"])
    errors = {}
    for name, files, mode, steps in (("plain", [nipype_pair["weights"]], "affine", None),
                                     ("recommended", [path], "affine", None),
                                     ("off", [path], "affine", 0),
                                     ("joint", [path], "joint", None)):
        models = load_models(mode, files)
        result = register(moving, fixed, models, mode=mode, extent=192,
                          refine_affine=steps, outputs=("forward",))
        assert ("refine_affine_loss" in result.info) == (name in ("recommended", "joint"))
        errors[name] = _pair_error(result.forward, nipype_pair["fixed"], (5.0, -3.0, 6.0),
                                   (4.0, -6.0, 3.0))
    assert errors["off"] == errors["plain"]
    # the tiny random detector is far off; refinement finds the transform in both modes
    assert errors["plain"] > 2.0, errors
    assert errors["recommended"] < 0.5 and errors["joint"] < 0.5, errors


def test_refine_affine_from_the_command_line(nipype_pair, tmp_path, capsys):
    base = ["register", "-e", "192", "-j", "1", "-w", str(nipype_pair["weights"]),
            str(nipype_pair["moving"]), str(nipype_pair["fixed"]), "-t", str(tmp_path / "a.h5")]
    assert main(base + ["-m", "affine", "--refine-affine", "4"]) == 0
    out = capsys.readouterr().out  # each level's losses, not one across the two
    assert "affine refinement (mind) loss" in out and "in 4 at 4 mm, " in out
    assert out.rstrip().endswith("in 2 at 2 mm")
    assert main(base + ["-m", "deform", "--refine-affine", "4"]) != 0
    assert "--refine-affine applies to the affine, rigid and joint modes" in (
        capsys.readouterr().err)


def _distractor_pair(n=48):
    """Image 2: a textured ball (the "brain") and, apart from it, a large bright textured
    slab (a "distractor", like a head that only one image shows). Image 1: the ball moved
    by a known shift, the slab where it was. Returns both images, the truth (image 2
    index -> image 1 index) and the balls' masks."""
    blobs = smooth((n, n, n), 3, passes=4)
    blobs = (blobs - blobs.min()) / (blobs.max() - blobs.min())
    grid = voxel_grid((n, n, n))
    centre = torch.tensor([0.36 * (n - 1), (n - 1) / 2, (n - 1) / 2])
    ball = (grid - centre).norm(dim=-1) < n / 4
    slab = (grid[..., 0] > 0.71 * n) & (grid[..., 0] < 0.94 * n)
    truth = np.eye(4)
    truth[:3, 3] = [2.5, -2.0, 2.0]
    shift = torch.tensor(truth[:3, 3], dtype=torch.float32)
    image_2 = torch.where(ball, 0.3 + 0.7 * blobs, 0.0) + torch.where(slab, 2 * blobs, 0)
    moved_ball = (grid - shift - centre).norm(dim=-1) < n / 4  # exact: no 0.5 thresholds
    image_1 = torch.where(moved_ball, 0.3 + 0.7 * sample_linear(blobs, grid - shift), 0.0) \
        + torch.where(slab, 2 * blobs, 0)
    return image_1, image_2, truth, moved_ball.float(), ball.float()


def test_masks_keep_a_distractor_out_of_the_affine_refinement():
    """Without masks the static slab holds the matrix near the identity; with the balls'
    masks (as ANTs' -x) the refinement finds the ball's shift."""
    image_1, image_2, truth, mask_1, mask_2 = _distractor_pair()
    start = np.eye(4)
    errors = {}
    for name, masks in (("none", (None, None)), ("fixed", (None, mask_2)),
                        ("both", (mask_1, mask_2))):
        refined, _ = refine_matrix(start, image_1, image_2, iterations=60, pools=(2, 1),
                                   mask_1=masks[0], mask_2=masks[1])
        errors[name] = float(np.abs(refined[:3, 3] - truth[:3, 3]).max())
    assert errors["none"] > 0.8, errors  # the distractor holds it back without masks
    assert errors["fixed"] < 0.3 and errors["both"] < 0.3, errors
    assert max(errors["fixed"], errors["both"]) < 0.6 * errors["none"], errors


def test_masks_keep_a_distractor_out_of_the_deformable_refinement():
    """The slab far from the ball moves the field without masks; with the fixed image's
    mask, no voxel of the field there changes (nothing outside the mask pulls), while
    the field inside still moves."""
    n = 32
    image_1, image_2, _, _, mask_2 = _distractor_pair(n)
    slab_core = torch.zeros(n, n, n, dtype=torch.bool)
    slab_core[int(0.76 * n):int(0.9 * n), 8:-8, 8:-8] = True  # > 8 voxels from the ball
    changed = {}
    for name, mask in (("none", None), ("fixed", mask_2)):
        svf, _ = refine_svf(torch.zeros(n, n, n, 3), image_1, image_2, iterations=1,
                            lam=0.0, similarity="ncc", lr=0.1, mask_2=mask)
        moved = svf.norm(dim=-1)
        changed[name] = (float(moved[slab_core].max()), float(moved[mask_2 > 0.5].max()))
    assert changed["none"][0] > 0.01, changed  # the distractor pulls without a mask
    assert changed["fixed"][0] == 0.0 and changed["fixed"][1] > 0.01, changed


def _slab_moving(nipype_pair, tmp_path):
    """The moving image of ``nipype_pair`` with a bright slab outside its brain mask."""
    img = nb.load(nipype_pair["moving"])
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    mask = np.asarray(nb.load(nipype_pair["mask"]).dataobj) > 0
    slab = np.zeros(data.shape, bool)
    slab[:, :, -30:] = True  # the top of the field of view, above most of the brain
    data[slab & ~mask] = 1.5 * data.max()
    moving = tmp_path / "moving_slab.nii.gz"
    nb.save(nb.Nifti1Image(data, img.affine), moving)
    return moving


def test_masks_from_the_command_line(nipype_pair, tmp_path, capsys):
    """--moving-mask keeps a bright slab that only the moving image shows out of the
    affine refinement; empty masks and masks without a refinement are refused."""
    moving = _slab_moving(nipype_pair, tmp_path)
    base = ["register", "-m", "affine", "-e", "192", "-j", "1", "--refine-affine", "40",
            "-w", str(nipype_pair["weights"]), str(moving), str(nipype_pair["fixed"])]
    errors = {}
    for name, extra in (("none", []), ("mask", ["--moving-mask", str(nipype_pair["mask"])])):
        out = tmp_path / f"{name}.txt"
        assert main(base + ["-t", str(out), *extra]) == 0
        from synthmorph_nipype.transforms import load_transform
        errors[name] = _pair_error(load_transform(out).chain, nipype_pair["fixed"],
                                   (5.0, -3.0, 6.0), (4.0, -6.0, 3.0))
    capsys.readouterr()
    assert errors["mask"] < 0.5 and errors["mask"] < errors["none"], errors
    empty = tmp_path / "empty.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), empty)
    assert main(base + ["-t", str(tmp_path / "e.txt"), "-x", str(empty)]) == 1
    assert "empty.nii.gz: the mask is empty" in capsys.readouterr().err
    assert not (tmp_path / "e.txt").exists()
    off = [a if a != "40" else "0" for a in base]
    assert main(off + ["-t", str(tmp_path / "o.txt"), "-x", str(nipype_pair["mask"])]) == 0
    err = capsys.readouterr().err
    assert "warning: the masks have no effect" in err and err.count("\n") == 1


def test_masks_in_the_interface(nipype_pair, tmp_path):
    from synthmorph_nipype.transforms import load_transform

    reg = SynthMorphRegister(moving_image=str(_slab_moving(nipype_pair, tmp_path)),
                             fixed_image=str(nipype_pair["fixed"]), mode="affine",
                             extent=192, weights=[str(nipype_pair["weights"])],
                             refine_affine=40, moving_mask=str(nipype_pair["mask"]),
                             num_threads=1)
    assert f"--moving-mask {nipype_pair['mask']}" in reg.cmdline and " -x " not in reg.cmdline
    res = reg.run(cwd=str(tmp_path))
    reg.inputs.fixed_mask = str(nipype_pair["mask"])
    assert f"-x {nipype_pair['mask']}" in reg.cmdline
    error = _pair_error(load_transform(res.outputs.forward_transform).chain,
                        nipype_pair["fixed"], (5.0, -3.0, 6.0), (4.0, -6.0, 3.0))
    assert error < 0.5


def test_recommend_script_records_a_refinement_the_engine_then_applies(nipype_pair, tmp_path):
    """``scripts/recommend.py`` (how the embedded weights' defaults are set) rewrites the
    metadata of a copy, weights untouched; ``load_models`` then recommends that
    refinement and ``synthmorph register`` applies it; a similarity the engine does not
    know is refused."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "recommend.py"
    weights = tmp_path / "w.pt"
    shutil.copy(nipype_pair["weights"], weights)
    before = load_checkpoint(weights)
    run = subprocess.run([sys.executable, str(script), str(weights), "--refine", "2",
                          "--refine-similarity", "mind+mi", "--refine-lambda", "0.7"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "refine 2" in run.stdout and "refine_similarity mind+mi" in run.stdout
    after = load_checkpoint(weights)
    for part in ("affine", "deform"):
        for key, value in before[part].state_dict().items():
            assert torch.equal(value, after[part].state_dict()[key]), key
    models = load_models("joint", [weights])
    assert (models.refine, models.refine_similarity, models.refine_lambda) == (
        2, "mind+mi", 0.7)
    result = register(nb.load(nipype_pair["moving"]), nb.load(nipype_pair["fixed"]), models,
                      mode="joint", extent=192, refine_affine=0, outputs=("forward",))
    assert result.info["refine_similarity"] == "mind+mi"
    assert len(result.info["refine_loss"]) == 2 and len(result.info["refine_fine_loss"]) == 1
    bad = subprocess.run([sys.executable, str(script), str(weights), "--refine-similarity",
                          "cc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
