"""Geometry end to end: known transforms written by us, read back by SimpleITK and
nitransforms, must resample and map points as our own ``synthmorph apply`` does.

The moving and fixed images are copies of nilearn's 2 mm template on three grids: as is
(RAS), oblique and anisotropic, and LPS-reoriented. The copies are made with scipy only,
so a wrong geometry in our code cannot hide in the test inputs. ``synthmorph register``
runs with tiny random weights (from ``conftest``): its transforms are arbitrary but must be
self-consistent across formats and readers.

Every CLI call runs in this process with one torch thread (``-j 1`` for ``register``):
results are then deterministic, and on small machines much faster than with several.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nitransforms as nt
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nitransforms.linear import load as nt_linear_load
from nitransforms.manip import load as nt_chain_load
from nitransforms.nonlinear import load as nt_field_load
from scipy.ndimage import map_coordinates

from synthmorph_nipype.cli.main import main
from synthmorph_nipype.engine.resample import resample
from synthmorph_nipype.ops.rotation import rotation
from synthmorph_nipype.transforms import (
    Affine,
    Chain,
    DisplacementField,
    ImageGrid,
    load_transform,
    save_transform,
)

pytestmark = pytest.mark.filterwarnings("ignore:Reference space not set")  # nitransforms

FLIP = np.array([-1.0, -1.0, 1.0])
MIN_CORR = 0.999
POINT_TOL = 0.1  # mm, known transforms
FORMAT_TOL = 1e-3  # mm, the same registration written in several formats
ROUNDTRIP_MEDIAN = 0.5  # mm, forward then inverse of a warp
AFFINE_FORMATS = (".lta", ".txt", ".mat", ".h5", ".nii.gz")
FIELD_FORMATS = (".h5", ".nii.gz")
METRICS: dict[str, list[tuple[str, float]]] = {"corr": [], "point": [], "roundtrip": []}


# --------------------------------------------------------------------------- helpers
def known_affine(rot=(0, 0, 0), shift=(0, 0, 0), scale=(1, 1, 1), shear=(0, 0, 0)):
    """4x4 RAS matrix ``[R @ Sh @ S | t]`` (shear: the upper triangle xy, xz, yz)."""
    sh = np.eye(3)
    sh[np.triu_indices(3, 1)] = shear
    m = np.eye(4)
    m[:3, :3] = rotation(rot) @ sh @ np.diag(scale)
    m[:3, 3] = shift
    return m


# Pull-back maps (fixed RAS -> moving RAS), with the moving and the fixed grid kinds.
AFFINE_CASES = {
    "rot15-shift20": (known_affine(rot=(15, 0, 0), shift=(20, 0, 0)), "oblique", "ras"),
    "scale-shear": (
        known_affine(rot=(0, 0, -6), shift=(0, -8, 5), scale=(0.9, 1.1, 1.05),
                     shear=(0.1, -0.06, 0.08)),
        "ras", "lps"),
    "all": (
        known_affine(rot=(-9, 15, 11), shift=(-14, 20, -12), scale=(1.1, 0.93, 0.96),
                     shear=(-0.08, 0.1, -0.1)),
        "lps", "oblique"),
}


def smooth_displacement(points: np.ndarray) -> np.ndarray:
    """A known smooth RAS displacement (mm) of world points: low-frequency sinusoids,
    at most about 5 mm."""
    x = np.asarray(points, dtype=np.float64)
    tau = 2 * np.pi
    dx = 3.0 * np.sin(tau * x @ [1.0, 0.5, 0.0] / 120 + 0.3) + 1.5 * np.cos(tau * x[:, 2] / 80)
    dy = 2.5 * np.sin(tau * x @ [0.3, 1.0, 0.2] / 100 + 1.0)
    dz = 3.0 * np.cos(tau * x @ [0.5, 0.2, 1.0] / 90 - 0.5)
    return np.stack([dx, dy, dz], -1)


def grid_points(grid: ImageGrid, idx: np.ndarray) -> np.ndarray:
    return np.asarray(idx, float) @ grid.affine[:3, :3].T + grid.affine[:3, 3]


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def sample_on(img: nib.Nifti1Image, grid: ImageGrid, order: int, world=None) -> np.ndarray:
    """``img`` sampled (scipy) at the voxel centres of ``grid``, optionally first mapped
    through the RAS matrix ``world``."""
    pts = grid.world_points().reshape(-1, 3)
    if world is not None:
        pts = pts @ world[:3, :3].T + world[:3, 3]
    inv = np.linalg.inv(img.affine)
    idx = pts @ inv[:3, :3].T + inv[:3, 3]
    data = np.asarray(img.dataobj, dtype=np.float32)
    out = map_coordinates(data, idx.T, order=order, mode="constant", cval=0.0)
    return out.reshape(grid.shape)


def oblique_grid(centre, extent) -> ImageGrid:
    """A grid rotated by (12, -10, 15) degrees with 2.2 x 2 x 3 mm voxels."""
    lin = rotation([12.0, -10.0, 15.0]) @ np.diag([2.2, 2.0, 3.0])
    shape = np.ceil(np.asarray(extent) / [2.2, 2.0, 3.0]).astype(int)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(centre) - lin @ ((shape - 1) / 2)
    return ImageGrid.make(shape, aff)


def flip_xy(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LPS-reoriented copy: the first two array axes reversed, the same world positions."""
    n = np.asarray(data.shape[:3])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = n[:2] - 1
    return np.ascontiguousarray(data[::-1, ::-1]), affine @ flip


def sitk_map(tx: sitk.Transform, points_ras: np.ndarray) -> np.ndarray:
    """Map RAS points through an ITK (LPS) transform."""
    return np.array([tx.TransformPoint(tuple(p * FLIP)) for p in points_ras]) * FLIP


def sitk_transform(path: Path) -> sitk.Transform:
    if str(path).endswith(".nii.gz"):
        img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(img)
    return sitk.ReadTransform(str(path))


def nt_transform(path: Path):
    """nitransforms' reading of a transform file (its ``map`` is the pull-back)."""
    name = str(path)
    if name.endswith(".lta"):
        return nt_linear_load(name, fmt="fs")
    if name.endswith((".txt", ".mat")):
        return nt_linear_load(name, fmt="itk")
    if name.endswith(".h5"):
        return nt_chain_load(name, fmt="itk")
    return nt_field_load(name, fmt="itk")


def sitk_resample(tx, moving: Path, reference: Path, nearest: bool = False) -> np.ndarray:
    mov = sitk.ReadImage(str(moving))
    if not nearest:
        mov = sitk.Cast(mov, sitk.sitkFloat32)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(mov, sitk.ReadImage(str(reference)), tx, interp, 0.0, mov.GetPixelID())
    return sitk.GetArrayFromImage(out).T


def nt_resample(xfm, moving: Path, reference: Path) -> np.ndarray:
    out = nt.resampling.apply(xfm, str(moving), reference=str(reference), order=1,
                              mode="constant", cval=0.0, prefilter=False,
                              output_dtype=np.float32)
    return np.asarray(out.dataobj, dtype=np.float32)


def load_data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, label: str) -> float:
    value = float(np.corrcoef(a[mask].ravel(), b[mask].ravel())[0, 1])
    METRICS["corr"].append((label, value))
    return value


def max_error(got: np.ndarray, expected: np.ndarray, label: str) -> float:
    value = float(np.linalg.norm(got - expected, axis=1).max())
    METRICS["point"].append((label, value))
    return value


def cli(*args) -> None:
    rc = main([str(a) for a in args])
    assert rc == 0, f"synthmorph {' '.join(map(str, args))} returned {rc}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the in-process CLI calls; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    for kind, rows in METRICS.items():  # shown with pytest -s
        if rows:
            pick = min if kind == "corr" else max
            label, value = pick(rows, key=lambda r: r[1])
            print(f"\n[geometry] {kind}: n={len(rows)} worst={value:.8f} ({label})")


# --------------------------------------------------------------------------- test inputs
class Space:
    """A test image on one grid: its file, grid and brain mask."""

    def __init__(self, path: Path, mask: np.ndarray):
        self.path = path
        self.grid = ImageGrid.from_image(nib.load(str(path)))
        self.mask = mask
        self.brain_idx = np.argwhere(mask)

    def brain_points(self, rng: np.random.Generator, n: int = 300, jitter: bool = True):
        idx = self.brain_idx[rng.choice(len(self.brain_idx), n, replace=False)].astype(float)
        if jitter:
            idx = idx + rng.uniform(-0.5, 0.5, idx.shape)
        return grid_points(self.grid, idx)


@pytest.fixture(scope="module")
def spaces(template, tmp_path_factory) -> dict[str, Space]:
    """``moving-<kind>``: the template on a full-field grid; ``fixed-<kind>``: on a grid
    around the brain (smaller, faster to resample onto)."""
    from nilearn.datasets import load_mni152_brain_mask

    root = tmp_path_factory.mktemp("spaces")
    tpl = nib.load(str(template))
    data = np.asarray(tpl.dataobj, dtype=np.float32)
    mask_img = load_mni152_brain_mask(resolution=2)
    mask = np.asarray(mask_img.dataobj) > 0
    assert mask_img.shape == tpl.shape and np.allclose(mask_img.affine, tpl.affine)
    lo, hi = np.argwhere(mask).min(0) - 4, np.argwhere(mask).max(0) + 5
    lo, hi = np.maximum(lo, 0), np.minimum(hi, tpl.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    crop_aff = tpl.affine.copy()
    crop_aff[:3, 3] += tpl.affine[:3, :3] @ lo
    full = ImageGrid.from_image(tpl)
    corners = grid_points(full, np.array([[0, 0, 0], np.asarray(full.shape) - 1]))
    box = grid_points(ImageGrid.make(data[crop].shape, crop_aff),
                      np.array([[0, 0, 0], np.asarray(data[crop].shape) - 1]))

    out: dict[str, Space] = {"moving-ras": Space(Path(template), mask)}
    out["fixed-ras"] = Space(save_nifti(data[crop], crop_aff, root / "fixed-ras.nii.gz"),
                             mask[crop])
    for role, (d, m, a) in {"moving": (data, mask, tpl.affine),
                            "fixed": (data[crop], mask[crop], crop_aff)}.items():
        d2, a2 = flip_xy(d, a)
        out[f"{role}-lps"] = Space(save_nifti(d2, a2, root / f"{role}-lps.nii.gz"),
                                   flip_xy(m, a)[0])
    for role, (lo_w, hi_w) in {"moving": corners, "fixed": box}.items():
        grid = oblique_grid((lo_w + hi_w) / 2, np.abs(hi_w - lo_w) + (20 if role == "moving"
                                                                      else 6))
        vol = sample_on(tpl, grid, order=1)
        msk = sample_on(mask_img, grid, order=0) > 0.5
        out[f"{role}-oblique"] = Space(
            save_nifti(vol, grid.affine, root / f"{role}-oblique.nii.gz"), msk)
    # the copies really are on different grids, with the same anatomy in world space
    lps = nib.load(str(out["moving-lps"].path))
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    assert np.allclose(sample_on(lps, full, order=1), data, atol=1e-5)
    obl = out["fixed-oblique"].grid
    assert not np.allclose(np.abs(obl.affine[:3, :3] / obl.zooms), np.eye(3), atol=0.1)
    assert np.allclose(sorted(obl.zooms), [2.0, 2.2, 3.0])
    return out


def write_and_apply(truth: Chain, moving, fixed, path: Path):
    """Write ``truth`` to ``path`` and resample the moving image through it with our
    ``apply``; returns the output path and data."""
    save_transform(path, truth, source=moving.grid, reference=fixed.grid)
    ours_path = path.parent / "ours.nii.gz"
    cli("apply", "--reference", fixed.path, path, moving.path, ours_path)
    return ours_path, load_data(ours_path)


# --------------------------------------------------------------------------- known affines
@pytest.mark.parametrize("suffix", AFFINE_FORMATS)
@pytest.mark.parametrize("case", list(AFFINE_CASES))
def test_known_affine_all_formats(spaces, tmp_path, case, suffix):
    matrix, mkind, fkind = AFFINE_CASES[case]
    moving, fixed = spaces[f"moving-{mkind}"], spaces[f"fixed-{fkind}"]
    truth = Chain([Affine(matrix)])
    path = tmp_path / f"xfm{suffix}"
    ours_path, ours = write_and_apply(truth, moving, fixed, path)
    label = f"{case}{suffix}"
    assert ours.shape == fixed.grid.shape
    assert np.allclose(nib.load(str(ours_path)).affine, fixed.grid.affine, atol=1e-4)
    # the transform matters: without it the images would not agree
    ident = sample_on(nib.load(str(moving.path)), fixed.grid, order=1)
    assert corr(ours, ident, fixed.mask, f"{label} identity (control)") < 0.95
    METRICS["corr"].pop()

    rng = np.random.default_rng(len(label))
    pts = fixed.brain_points(rng)
    nodes = fixed.brain_points(rng, jitter=False)
    expected = truth.map(pts)

    readers = ["nitransforms"] if suffix == ".lta" else ["sitk", "nitransforms"]
    for reader in readers:
        if reader == "sitk":
            tx = sitk_transform(path)
            other = sitk_resample(tx, moving.path, fixed.path)
            got = sitk_map(tx, pts)
            err = max_error(got, expected, f"{label} sitk")
        else:
            xfm = nt_transform(path)
            other = nt_resample(xfm, moving.path, fixed.path)
            # nitransforms interpolates fields off their nodes with cubic splines
            probe = nodes if suffix == ".nii.gz" else pts
            err = max_error(np.asarray(xfm.map(probe)), truth.map(probe),
                            f"{label} nitransforms")
        c = corr(ours, other, fixed.mask, f"{label} {reader}")
        assert c >= MIN_CORR, f"{reader}: correlation {c:.5f} with ours"
        assert err < POINT_TOL, f"{reader}: points off by {err:.4f} mm"

    loaded = load_transform(path).chain
    assert max_error(loaded.map(pts), expected, f"{label} ours") < POINT_TOL


# --------------------------------------------------------------------------- known warps
def known_warp(kind: str, spaces) -> tuple[Chain, Space, Space]:
    """A smooth displacement on the fixed grid, alone or after an affine."""
    if kind == "field":
        moving, fixed = spaces["moving-ras"], spaces["fixed-oblique"]
        members = []
    else:
        moving, fixed = spaces["moving-oblique"], spaces["fixed-lps"]
        members = [Affine(AFFINE_CASES["all"][0])]
    pts = fixed.grid.world_points().reshape(-1, 3)
    disp = smooth_displacement(pts).reshape(*fixed.grid.shape, 3)
    return Chain([*members, DisplacementField(fixed.grid, disp)]), moving, fixed


@pytest.mark.parametrize("suffix", FIELD_FORMATS)
@pytest.mark.parametrize("kind", ["field", "affine+field"])
def test_known_warp_all_formats(spaces, tmp_path, kind, suffix):
    truth, moving, fixed = known_warp(kind, spaces)
    path = tmp_path / f"warp{suffix}"
    _, ours = write_and_apply(truth, moving, fixed, path)
    label = f"{kind}{suffix}"

    rng = np.random.default_rng(7)
    pts = fixed.brain_points(rng)
    nodes = fixed.brain_points(rng, jitter=False)
    # at the nodes the field is the analytic displacement, independent of our code
    analytic = nodes + smooth_displacement(nodes)
    if kind != "field":
        analytic = truth[0].map(analytic)
    assert np.abs(truth.map(nodes) - analytic).max() < 1e-4
    assert np.linalg.norm(smooth_displacement(nodes), axis=1).max() > 3.0

    tx = sitk_transform(path)
    c = corr(ours, sitk_resample(tx, moving.path, fixed.path), fixed.mask, f"{label} sitk")
    assert c >= MIN_CORR
    assert max_error(sitk_map(tx, pts), truth.map(pts), f"{label} sitk") < POINT_TOL
    assert max_error(sitk_map(tx, nodes), analytic, f"{label} sitk nodes") < POINT_TOL

    xfm = nt_transform(path)
    c = corr(ours, nt_resample(xfm, moving.path, fixed.path), fixed.mask,
             f"{label} nitransforms")
    assert c >= MIN_CORR
    got = np.asarray(xfm.map(nodes))
    assert max_error(got, analytic, f"{label} nitransforms nodes") < POINT_TOL

    assert max_error(load_transform(path).chain.map(pts), truth.map(pts),
                     f"{label} ours") < POINT_TOL


# --------------------------------------------------------------------------- registration
MOVED_BY = known_affine(rot=(10, -6, 8), shift=(9, -12, 6), scale=(1.05, 0.95, 1.0))


def register_inputs(template, spaces, root: Path) -> tuple[Path, Path, Path]:
    """Moving: the template moved by ``MOVED_BY``, contrast changed, on the full oblique
    grid; fixed: the template as is; and the initial transform that undoes the move."""
    tpl = nib.load(str(template))
    grid = spaces["moving-oblique"].grid
    vol = sample_on(tpl, grid, order=1, world=MOVED_BY)
    vol = np.where(vol > 0.05, 1.3 - vol, 0.0).astype(np.float32) * 100
    init = root / "init.txt"
    save_transform(init, Chain([Affine(np.linalg.inv(MOVED_BY))]))
    return save_nifti(vol, grid.affine, root / "moving.nii.gz"), Path(template), init


@pytest.fixture(scope="module")
def mild_joint_weights(tiny_weights, tmp_path_factory) -> Path:
    """``tiny_weights['joint']`` with the last U-Net layer scaled by a further 0.05.

    With two different images the fixture's random network gives a velocity field of
    about 12 half-resolution voxels (median) that folds in a third of the voxels, so no
    inverse can undo it. Scaled down, the warp is smooth and invertible (a few mm)."""
    from synthmorph_nipype.models.checkpoint import load_checkpoint, save_checkpoint

    parts = load_checkpoint(tiny_weights["joint"])
    with torch.no_grad():
        last = parts["deform"].convs[-1]
        last.hyperkernel.weight.mul_(0.05)
        last.hyperkernel.bias.mul_(0.05)
    path = tmp_path_factory.mktemp("mild") / "joint.pt"
    save_checkpoint(path, affine=parts["affine"], deform=parts["deform"])
    return path


@pytest.fixture(scope="module")
def registered(template, tiny_weights, mild_joint_weights, spaces,
               tmp_path_factory) -> dict[str, Path]:
    """Output files of deterministic (one thread) register runs, all from the initial
    affine ``-i``: a joint run writing ``.h5``, one writing ``.nii.gz``, and four affine
    runs writing each affine format."""
    root = tmp_path_factory.mktemp("registered")
    moving, fixed, init = register_inputs(template, spaces, root)
    files = {"moving": moving, "fixed": fixed}
    common = ("-e", "192", "-j", "1")
    for suffix in FIELD_FORMATS:
        name = suffix.strip(".").replace(".", "")
        fw, bw = root / f"fw{suffix}", root / f"bw{suffix}"
        out = ("-o", root / f"moved_{name}.nii.gz", "-O", root / f"fixed_moved_{name}.nii.gz")
        cli("register", "-m", "joint", *common, "-w", mild_joint_weights, "-i", init,
            "-t", fw, "-T", bw, *out, moving, fixed)
        files.update({f"fw{suffix}": fw, f"bw{suffix}": bw, f"moved{suffix}": out[1],
                      f"fixed_moved{suffix}": out[3]})
    for suffix in (".lta", ".txt", ".mat", ".h5"):
        a, a_inv = root / f"a{suffix}", root / f"a_inv{suffix}"
        extra = ()
        if suffix == ".lta":
            extra = ("-H", "-o", root / "moved_header.nii.gz")
        elif suffix == ".txt":
            extra = ("-o", root / "moved_affine.nii.gz")
        cli("register", "-m", "affine", *common, "-w", tiny_weights["affine"], "-i", init,
            "-t", a, "-T", a_inv, *extra, moving, fixed)
        files.update({f"a{suffix}": a, f"a_inv{suffix}": a_inv})
    files["moved_header"] = root / "moved_header.nii.gz"
    files["moved_affine"] = root / "moved_affine.nii.gz"
    return files


def _fixed_space(registered, spaces) -> Space:
    fixed = spaces["moving-ras"]
    assert Path(registered["fixed"]) == fixed.path
    return fixed


@pytest.mark.parametrize("suffix", FIELD_FORMATS)
def test_joint_forward_then_inverse(registered, spaces, suffix):
    fixed = _fixed_space(registered, spaces)
    fw_path, bw_path = registered[f"fw{suffix}"], registered[f"bw{suffix}"]
    rng = np.random.default_rng(3)
    pts = fixed.brain_points(rng, n=400)

    ours_fw, ours_bw = load_transform(fw_path).chain, load_transform(bw_path).chain
    moved = ours_fw.map(pts)
    assert np.median(np.linalg.norm(moved - pts, axis=1)) > 2.0  # a real transform
    if suffix == ".h5":
        assert [type(t) for t in ours_fw] == [Affine, DisplacementField]
        # the deformable part moves points too (beyond the affine one)
        assert np.median(np.linalg.norm(ours_fw[0].map(pts) - moved, axis=1)) > 0.5
    else:
        assert [type(t) for t in ours_fw] == [DisplacementField]
    # -i: the result holds the initial affine (the tiny network adds little to it)
    init_err = np.linalg.norm(Affine(np.linalg.inv(MOVED_BY)).map(pts) - moved, axis=1)
    assert np.median(init_err) < 5.0

    tx_fw, tx_bw = sitk_transform(fw_path), sitk_transform(bw_path)
    sitk_moved = sitk_map(tx_fw, pts)
    assert max_error(sitk_moved, moved, f"joint fw{suffix} sitk vs ours") < POINT_TOL
    for reader, back in (("sitk", sitk_map(tx_bw, sitk_moved)),
                         ("ours", ours_bw.map(moved))):
        dist = np.linalg.norm(back - pts, axis=1)
        METRICS["roundtrip"].append((f"joint{suffix} {reader} median", float(np.median(dist))))
        assert np.median(dist) < ROUNDTRIP_MEDIAN, f"{reader}: median {np.median(dist):.3f}"
        assert np.percentile(dist, 95) < 4 * ROUNDTRIP_MEDIAN
    # the composition of the two really is near the identity, not both identities
    assert np.median(np.linalg.norm(sitk_map(tx_bw, pts) - pts, axis=1)) > 2.0

    # nitransforms: the forward field lives on the fixed grid; probe at its nodes
    nodes = fixed.brain_points(rng, jitter=False)
    got = np.asarray(nt_transform(fw_path).map(nodes))
    assert max_error(got, ours_fw.map(nodes), f"joint fw{suffix} nitransforms") < POINT_TOL

    # what register resampled (-o, -O) is what SimpleITK resamples with the files
    moving = spaces["moving-oblique"]
    assert ImageGrid.from_image(nib.load(str(registered["moving"]))).same_as(moving.grid)
    moved_img = load_data(registered[f"moved{suffix}"])
    other = sitk_resample(sitk_transform(fw_path), registered["moving"], fixed.path)
    assert corr(moved_img, other, fixed.mask, f"joint -o{suffix} sitk") >= MIN_CORR
    back_img = load_data(registered[f"fixed_moved{suffix}"])
    other = sitk_resample(sitk_transform(bw_path), fixed.path, registered["moving"])
    assert corr(back_img, other, moving.mask, f"joint -O{suffix} sitk") >= MIN_CORR


def test_joint_dense_field_matches_composite(registered, spaces):
    fixed = _fixed_space(registered, spaces)
    pts = fixed.brain_points(np.random.default_rng(4), n=400)
    # forward at fixed brain points, inverse at the moving points they map to
    probes = {"fw": pts, "bw": load_transform(registered["fw.h5"]).chain.map(pts)}
    for name, probe in probes.items():
        h5 = sitk_transform(registered[f"{name}.h5"])
        dense = sitk_transform(registered[f"{name}.nii.gz"])
        err = max_error(sitk_map(dense, probe), sitk_map(h5, probe),
                        f"joint {name}.nii.gz vs {name}.h5 sitk")
        assert err < POINT_TOL, f"{name}: dense field off the composite by {err:.4f} mm"
    grid = load_transform(registered["fw.nii.gz"]).reference
    assert grid.same_as(fixed.grid)


def test_affine_register_formats_agree(registered, spaces):
    fixed = _fixed_space(registered, spaces)
    rng = np.random.default_rng(5)
    pts = fixed.brain_points(rng)
    reference = sitk_map(sitk_transform(registered["a.txt"]), pts)
    assert np.median(np.linalg.norm(reference - pts, axis=1)) > 1.0  # a real transform
    moved_pts = reference
    for suffix in (".lta", ".txt", ".mat", ".h5"):
        fw, inv = registered[f"a{suffix}"], registered[f"a_inv{suffix}"]
        readers = {"nitransforms": lambda p, x: np.asarray(nt_transform(x).map(p))}
        if suffix != ".lta":
            readers["sitk"] = lambda p, x: sitk_map(sitk_transform(x), p)
        for reader, mapper in readers.items():
            label = f"register a{suffix} {reader}"
            got = mapper(pts, fw)
            assert max_error(got, reference, label) < FORMAT_TOL
            back = mapper(got, inv)
            assert max_error(back, pts, f"{label} -T after -t") < FORMAT_TOL
            assert max_error(mapper(moved_pts, inv), pts, f"{label} -T") < FORMAT_TOL
        assert np.abs(load_transform(fw).chain.map(pts) - reference).max() < FORMAT_TOL

    # -H -o (header only) resampled back onto the fixed grid (scipy, through the sform:
    # the matrix may shear, which the qform and ITK cannot hold) is what -o gave
    header = nib.load(str(registered["moved_header"]))
    moving = nib.load(str(registered["moving"]))
    assert np.array_equal(np.asarray(header.dataobj), np.asarray(moving.dataobj))
    assert not np.allclose(header.affine, moving.affine, atol=0.5)
    back = sample_on(header, fixed.grid, order=1)
    moved = load_data(registered["moved_affine"])
    assert corr(moved, back, fixed.mask, "register -H vs -o") >= MIN_CORR
    other = sitk_resample(sitk_transform(registered["a.txt"]), registered["moving"],
                          fixed.path)
    assert corr(moved, other, fixed.mask, "register affine -o sitk") >= MIN_CORR


# --------------------------------------------------------------------------- labels, -H
LABELS = np.array([0, 4, 17, 42, 251, 1001], dtype=np.int16)


@pytest.mark.parametrize("kind", ["affine", "affine+field"])
def test_nearest_keeps_labels(spaces, tmp_path, kind):
    moving, fixed = spaces["moving-oblique"], spaces["fixed-lps"]
    if kind == "affine":
        chain = Chain([Affine(AFFINE_CASES["scale-shear"][0])])
    else:
        chain = known_warp("affine+field", spaces)[0]
    path = tmp_path / "xfm.h5"
    save_transform(path, chain)
    data = load_data(moving.path)
    labels = LABELS[np.digitize(data, [0.1, 0.3, 0.5, 0.7, 0.85])]
    lab_path = save_nifti(labels, moving.grid.affine, tmp_path / "labels.nii.gz")
    out_path = tmp_path / "labels_moved.nii.gz"
    cli("apply", "-m", "nearest", "--reference", fixed.path, path, lab_path, out_path)
    out = load_data(out_path)
    assert out.dtype == np.int16
    values = set(np.unique(out).tolist())
    assert values <= set(LABELS.tolist()), f"new values {values - set(LABELS.tolist())}"
    assert values == set(np.unique(labels).tolist())
    other = sitk_resample(sitk_transform(path), lab_path, fixed.path, nearest=True)
    agree = float(np.mean(out[fixed.mask] == other[fixed.mask]))
    METRICS["corr"].append((f"nearest {kind} agreement with sitk", agree))
    assert agree > 0.99


@pytest.mark.parametrize("suffix", [".lta", ".h5"])
@pytest.mark.parametrize("case", ["rot15-shift20", "all"])
def test_apply_header_only(spaces, tmp_path, case, suffix):
    matrix, mkind, fkind = AFFINE_CASES[case]
    moving, fixed = spaces[f"moving-{mkind}"], spaces[f"fixed-{fkind}"]
    path = tmp_path / f"xfm{suffix}"
    save_transform(path, Chain([Affine(matrix)]), source=moving.grid, reference=fixed.grid)
    header_path, moved_path = tmp_path / "header.nii.gz", tmp_path / "moved.nii.gz"
    cli("apply", "-H", path, moving.path, header_path)
    cli("apply", "--reference", fixed.path, path, moving.path, moved_path)
    header = nib.load(str(header_path))
    assert np.array_equal(np.asarray(header.dataobj), load_data(moving.path))
    moved = load_data(moved_path)
    # resampled back onto the fixed grid through its sform (scipy) ...
    back = sample_on(header, fixed.grid, order=1)
    assert corr(moved, back, fixed.mask, f"apply -H {case}{suffix} scipy") >= MIN_CORR
    if case == "rot15-shift20":
        # ... and, for a rigid move (ITK grids cannot shear), by SimpleITK
        identity = sitk.Transform(3, sitk.sitkIdentity)
        back = sitk_resample(identity, header_path, fixed.path)
        assert corr(moved, back, fixed.mask, f"apply -H {case}{suffix} sitk") >= MIN_CORR
    # world positions: voxel v of the header-moved image sits where the transform sends it
    rng = np.random.default_rng(1)
    idx = rng.uniform(10, 40, (50, 3))
    pts = grid_points(ImageGrid.from_image(header), idx)
    assert np.abs(Affine(matrix).map(pts) - grid_points(moving.grid, idx)).max() < 1e-3


def test_apply_header_only_refuses_warps(spaces, tmp_path, capsys):
    chain, moving, _ = known_warp("affine+field", spaces)
    path = tmp_path / "warp.h5"
    save_transform(path, chain)
    rc = main(["apply", "-H", str(path), str(moving.path), str(tmp_path / "out.nii.gz")])
    assert rc == 1
    assert "affine" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("suffix", [".h5", ".txt"])
def test_resampling_matches_itk_at_the_edges_of_a_thick_slice_image(tmp_path, suffix):
    """A thick-slice (2.4 mm), oblique image moved by a known affine: SimpleITK applying
    our transform file gives our ``apply`` output at every voxel, the half voxel beyond
    the outer slice centres included (ITK interpolates there; a rule that stops at the
    centres differs along the slab's faces)."""
    rng = np.random.default_rng(0)
    shape = (40, 44, 12)
    lin = rotation([10.0, -8.0, 20.0]) @ np.diag([1.5, 1.5, 2.4])
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ ((np.array(shape) - 1) / 2)
    data = (rng.random(shape) + np.linspace(0, 2, shape[2])).astype(np.float32)
    moving = save_nifti(data, aff, tmp_path / "thick.nii.gz")
    # the reference grid: 1 mm, wider than the slab so its faces cross the voxels
    ref_shape = (70, 70, 50)
    ref_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    ref_aff[:3, 3] = -(np.array(ref_shape) - 1) / 2
    reference = save_nifti(np.zeros(ref_shape, np.float32), ref_aff, tmp_path / "ref.nii.gz")
    xfm = tmp_path / f"fwd{suffix}"
    save_transform(xfm, Chain([Affine(known_affine(rot=(4, -3, 6), shift=(1.3, -2.2, 0.7)))]))
    ours = tmp_path / "ours.nii.gz"
    assert main(["apply", str(xfm), str(moving), str(ours), "--reference", str(reference)]) == 0
    got = np.asarray(nib.load(str(ours)).dataobj)
    other = sitk_resample(sitk_transform(xfm), moving, reference)
    inside = other != 0
    edge = inside & ~(np.abs(got - other) < 1e-4)
    assert inside.sum() > 5000 and (got != 0).sum() > 5000
    np.testing.assert_allclose(got, other, atol=1e-4,
                               err_msg=f"{edge.sum()} voxels differ (edges of the slab?)")


def test_whole_grid_work_slab_by_slab_equals_at_once(tmp_path, monkeypatch):
    """Resampling and the world-space fields are computed slab by slab (memory bounded by
    a slab): slabs of a few rows give what one slab over the whole grid gives."""
    from synthmorph_nipype.engine import compose
    from synthmorph_nipype.engine import resample as resample_module

    rng = np.random.default_rng(4)
    shape = (13, 11, 9)
    aff = np.diag([1.2, 1.0, 0.9, 1.0])
    img = nib.Nifti1Image(rng.random(shape).astype(np.float32) * 300, aff)
    field = DisplacementField(ImageGrid.make(shape, aff), rng.normal(0, 0.7, (*shape, 3)))
    chain = Chain([Affine(known_affine(rot=(3, -2, 4), shift=(0.5, 0.2, -0.4))), field])
    out = torch.from_numpy(rng.normal(0, 0.5, (8, 8, 8, 3)).astype(np.float32))
    to_net, to_ras = np.diag([0.6, 0.7, 0.8, 1.0]), np.diag([1.1, 0.9, 1.0, 1.0])

    def everything():
        total = compose.world_field(out, to_ras, to_net, aff, shape)
        return (resample(img, chain, ImageGrid.make(shape, aff)).get_fdata(),
                resample(img, chain, ImageGrid.make(shape, aff), method="nearest",
                         dtype="uint8").get_fdata(),
                total.copy(),
                compose.world_field(out, known_affine(rot=(2, 1, 0)) @ to_ras, to_net, aff,
                                    shape))

    whole = everything()
    monkeypatch.setattr(resample_module, "SLAB", 2 * 11 * 9)  # two rows a slab
    monkeypatch.setattr(compose, "SLAB", 3 * 11 * 9 + 5)
    for a, b in zip(whole, everything(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
    assert np.abs(whole[0]).max() > 1 and np.abs(whole[3]).max() > 0.1


def test_world_field_through_an_inverse_affine_is_the_composite_residual():
    """The deformable member of a composite ``[A, w]`` comes from the same single pass
    over the grid: with ``inv(A) @ N`` for the network-to-world map, ``A(x + w(x))`` is
    the whole map ``x + total(x)`` at every voxel (ITK applies ``w`` first, then ``A``)."""
    from synthmorph_nipype.engine import compose

    rng = np.random.default_rng(5)
    shape, aff = (9, 8, 7), np.diag([1.1, 0.9, 1.3, 1.0])
    aff[:3, 3] = (-4.0, 3.0, 2.0)
    out = torch.from_numpy(rng.normal(0, 0.8, (6, 6, 6, 3)).astype(np.float32))
    to_net, to_ras = np.diag([0.6, 0.7, 0.8, 1.0]), np.diag([1.1, 0.9, 1.0, 1.0])
    a = known_affine(rot=(4, -3, 2), shift=(1.5, -0.5, 2.0))
    total = compose.world_field(out, to_ras, to_net, aff, shape)
    res = compose.world_field(out, np.linalg.inv(a) @ to_ras, to_net, aff, shape)
    x = nib.affines.apply_affine(aff, np.moveaxis(np.indices(shape), 0, -1))
    np.testing.assert_allclose(nib.affines.apply_affine(a, x + res), x + total, atol=1e-4)
    assert np.abs(res - total).max() > 0.5  # the affine's share was taken out


def test_resampling_memory_does_not_grow_with_the_output_grid(monkeypatch):
    """Peak memory of resampling (numpy's, traced) beyond the output image itself does not
    grow with the output grid: points are mapped slab by slab, never as a whole-grid array
    of float64 coordinates (which alone takes six times the output)."""
    import tracemalloc

    from synthmorph_nipype.engine import resample as resample_module

    img = nib.Nifti1Image(np.random.default_rng(1).random((48, 48, 48), np.float32),
                          np.diag([4.0, 4.0, 4.0, 1.0]))
    field = DisplacementField(ImageGrid.make((48, 48, 48), img.affine),
                              np.full((48, 48, 48, 3), 0.3))
    chain = Chain([Affine(known_affine(rot=(2, 0, 1))), field])
    monkeypatch.setattr(resample_module, "SLAB", 1 << 14)

    def extra(n: int) -> float:
        """Traced peak beyond the output, in MB, for an output grid of n^3."""
        grid = ImageGrid.make((n,) * 3, np.diag([192 / n] * 3 + [1.0]))
        tracemalloc.start()
        out = resample(img, chain, grid)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert np.asarray(out.dataobj).std() > 0
        return (peak - n**3 * 4) / 1e6

    small, large = extra(64), extra(128)  # 1 MB and 8 MB outputs
    assert large < 1.5 * small + 1.0, f"{small:.1f} MB beyond a 64^3 output, {large:.1f} at 128^3"


def test_half_resolution_field_equals_interpolating_its_full_grid():
    """The engine never builds the full-resolution network field: interpolating the
    half-resolution total map at a point (``HalfResField``) gives what linear interpolation
    of the full grid gives, also off the grid (clamped) and beyond the half-voxel edge."""
    from synthmorph_nipype.engine import compose
    from synthmorph_nipype.engine.network import HalfResField
    from synthmorph_nipype.ops.sampling import sample_linear

    rng = np.random.default_rng(7)
    half = torch.from_numpy(rng.normal(0, 2, (6, 6, 6, 3)).astype(np.float32))
    field = HalfResField(half, 12)
    full = field.full()
    assert full.shape == (12, 12, 12, 3)
    # on the lattice: u(x) = half(x / 2) - x / 2 (the last index clamps to half's edge)
    np.testing.assert_allclose(full[4, 6, 2], half[2, 3, 1] - torch.tensor([2.0, 3.0, 1.0]),
                               atol=1e-6)
    np.testing.assert_allclose(full[11, 0, 0], half[5, 0, 0] - torch.tensor([5.5, 0, 0]),
                               atol=1e-6)
    points = torch.from_numpy(rng.uniform(-2, 13, (500, 3)).astype(np.float32))
    np.testing.assert_allclose(field(points), sample_linear(full, points, boundary="clamp"),
                               atol=2e-5)
    # the world field is the same from either form
    shape, aff = (7, 8, 9), np.diag([1.5, 1.4, 1.3, 1.0])
    to_net, to_ras = np.diag([1.6, 1.5, 1.4, 1.0]), np.diag([1.1, 0.9, 1.0, 1.0])
    np.testing.assert_allclose(compose.world_field(field, to_ras, to_net, aff, shape),
                               compose.world_field(full, to_ras, to_net, aff, shape),
                               atol=5e-5)


def test_half_resolution_field_on_a_parallel_grid_is_interpolated_axis_by_axis():
    """A destination grid whose axes are parallel to the network grid's (permuted,
    flipped, partly beyond it) gets its field axis by axis: the same values as point by
    point, through ``world_field`` too, slab by slab and for an oblique grid."""
    from synthmorph_nipype.engine import compose
    from synthmorph_nipype.engine.network import HalfResField
    from synthmorph_nipype.ops.grid import affine_points
    from synthmorph_nipype.ops.sampling import axis_coordinates, axis_permutation

    rng = np.random.default_rng(11)
    field = HalfResField(torch.from_numpy(rng.normal(0, 2, (8, 8, 8, 3)).astype(np.float32)),
                         16)
    shape = (9, 11, 7)
    to_net = np.array([[0, 0, -1.3, 17.0], [1.7, 0, 0, -2.5], [0, 1.2, 0, 1.0], [0, 0, 0, 1]])
    perm = axis_permutation(to_net, shape)
    assert perm == (1, 2, 0)
    points = affine_points(to_net, shape)
    assert (points < 0).any() and (points > 15).any()  # clamped on both sides
    got = field.separable(axis_coordinates(to_net, shape, perm), perm)
    np.testing.assert_allclose(got, field(points), atol=2e-5)
    to_ras, aff = np.diag([1.1, 0.9, 1.0, 1.0]), np.diag([1.5, 1.4, 1.3, 1.0])
    full = field.full()
    old_slab = compose.SLAB
    try:
        compose.SLAB = 2 * 11 * 7  # two rows per slab
        np.testing.assert_allclose(compose.world_field(field, to_ras, to_net, aff, shape),
                                   compose.world_field(full, to_ras, to_net, aff, shape),
                                   atol=5e-5)
    finally:
        compose.SLAB = old_slab
    oblique = to_net.copy()
    oblique[0, 1] = 0.05
    assert axis_permutation(oblique, shape) is None
    np.testing.assert_allclose(compose.world_field(field, to_ras, oblique, aff, shape),
                               compose.world_field(full, to_ras, oblique, aff, shape),
                               atol=5e-5)
