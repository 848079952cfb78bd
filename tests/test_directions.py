"""Direction conventions of the whole linear registration engine, end to end.

No trained weights: the feature detector is built by hand so that output channel ``k``
lights up on exactly one blob of the scene, the blob of intensity level ``k``. Its
barycentres are then the blob centres (up to max-pooling), and the least-squares fit of
the detector must recover the known motion between the two images. Everything the
engine does with matrices on the way (network grids, half resolution, centring, which
network output is ``forward``, world matrices, ITK's LPS, the LTA's push-forward) must
therefore give ``forward.map(c) == T(c)`` where ``c`` is a blob centre in the fixed
image and ``T(c)`` the same blob in the moving image. Swapping moving and fixed, the two
network outputs, or inverting any matrix on the way sends ``c`` to ``inv(T)(c)`` or
elsewhere, tens of millimetres away.

The images are built analytically (anti-aliased spheres evaluated at voxel centres with
numpy), independently of the package's geometry code.

How the detector works (all kernels are centre taps except one, so the maps are
pointwise functions of the max-pooled image ``P``; the engine scales inputs to [0, 1]):

* encoder level (conv, LeakyReLU(0.2), max-pool 2): ``H_0 = P + 1`` and
  ``H_j = leaky(P - t_j)`` for thresholds ``t_j = 0.1 j``. LeakyReLU and max-pooling
  commute (both monotone), and ``relu(z) = (leaky(z) - 0.2 z) / 0.8`` recovers
  ``R_j = relu(P - t_j)`` as a linear function of ``H_j`` and ``H_0``;
* additional conv: channel ``k`` is a hat ``(R(L-w) - 2 R(L) + R(L+w)) / w`` that is 1 at
  the level ``L = 0.2 k`` and 0 outside ``L +- w``, minus ``G`` times the 3x3x3 sum of
  ``R(L+w)``: edge voxels of brighter blobs (whose interpolated values pass through the
  band of level ``k``) sit next to brighter voxels and are removed;
* output conv: identity, then ReLU (``relu(leaky(z)) = relu(z)``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nitransforms.linear import load as nt_linear_load
from scipy.spatial.transform import Rotation

from synthmorph_nipype.engine.register import register
from synthmorph_nipype.engine.weights import Models
from synthmorph_nipype.models.affine import AffineConfig, AffineDetector
from synthmorph_nipype.transforms import ImageGrid, save_transform

pytestmark = pytest.mark.filterwarnings("ignore:Reference space not set")  # nitransforms

EXTENT = 192
LEVELS = np.array([0.2, 0.4, 0.6, 0.8, 1.0])  # blob k has intensity LEVELS[k] * SCALE
HALF_BAND = 0.1  # each hat spans LEVELS[k] +- HALF_BAND
GAIN = 20.0  # suppression next to brighter voxels
SCALE = 750.0  # intensities in the files; the engine min-max scales them away
RADIUS = 8.0  # mm
FIX_CENTRE = np.array([6.0, -14.0, 9.0])  # world centre of the scene and of the fixed grid
OFFSETS = np.array([[34.0, 2.0, -4.0], [-30.0, 26.0, 6.0], [2.0, -32.0, 22.0],
                    [-12.0, 4.0, -34.0], [14.0, 24.0, 30.0]])
CENTRES = FIX_CENTRE + OFFSETS  # fixed-world blob centres, one per level
POINT_TOL = 1.5  # mm: barycentres of max-pooled maps (4 mm cells); measured up to 0.74
CHANNEL_TOL = 1.25  # mm, one barycentre in the sanity check (pooling); measured up to 0.84
LINEAR_TOL = 0.03  # largest entry error of the 3x3 part; measured up to 0.013
FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


# --------------------------------------------------------------------------- helpers
def motion(rotvec_deg, shift, scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """4x4 world map T (fixed RAS -> moving RAS): ``T(p) = A (p - o) + o + shift`` with
    ``A = R @ diag(scale)`` about the scene centre ``o``."""
    a = Rotation.from_rotvec(np.deg2rad(rotvec_deg)).as_matrix() @ np.diag(scale)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = FIX_CENTRE + np.asarray(shift, float) - a @ FIX_CENTRE
    return m


def apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


def grid_affine(linear: np.ndarray, shape, centre) -> np.ndarray:
    """vox2ras with the 3x3 part ``linear`` and the middle voxel at ``centre``."""
    aff = np.eye(4)
    aff[:3, :3] = linear
    aff[:3, 3] = np.asarray(centre, float) - linear @ ((np.asarray(shape) - 1) / 2)
    return aff


def scene(points: np.ndarray, centres: np.ndarray, voxel: float,
          levels: np.ndarray = LEVELS) -> np.ndarray:
    """Anti-aliased spheres (edge ramp one voxel wide) at ``centres``, blob k at level k."""
    out = np.zeros(len(points), np.float64)
    for level, c in zip(levels, centres, strict=True):
        dist = np.linalg.norm(points - c, axis=1)
        out += level * np.clip((RADIUS - dist) / voxel + 0.5, 0.0, 1.0)
    return out


def blob_image(shape, affine: np.ndarray, centres: np.ndarray) -> nib.Nifti1Image:
    """A float32 image of the scene with blobs at the world points ``centres`` (each blob
    evaluated in its bounding box of voxels only)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    data = np.zeros(shape, np.float32)
    for level, c in zip(LEVELS, centres, strict=True):
        idx_c = apply(np.linalg.inv(affine), c[None])[0]
        half = (RADIUS + zooms.max()) / zooms
        lo = np.maximum(np.floor(idx_c - half), 0).astype(int)
        hi = np.minimum(np.ceil(idx_c + half) + 1, shape).astype(int)
        assert np.all(hi - lo > 2 * RADIUS / zooms), "blob outside the image"
        box = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)],
                                   indexing="ij"), -1)
        pts = apply(affine, box.reshape(-1, 3).astype(np.float64))
        vals = scene(pts, c[None], zooms.max(), LEVELS[LEVELS == level])
        data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += SCALE * vals.reshape(box.shape[:3])
    return nib.Nifti1Image(data, affine)


def relu_of_threshold(j: int) -> tuple[np.ndarray, float]:
    """``R_j = relu(P - t_j)`` as ``(coefficients on H_0..H_10, constant)``."""
    coef = np.zeros(11)
    if j > 10:  # t_j > 1 >= P
        return coef, 0.0
    t = 0.1 * j
    coef[j] += 1.25
    coef[0] -= 0.25
    return coef, 0.25 * (1.0 + t)


def hand_detector(rigid: bool = False) -> AffineDetector:
    """The blob-level detector described in the module docstring."""
    n = len(LEVELS)
    config = AffineConfig(num_feat=n, enc_nf=(11,), dec_nf=(), add_nf=(n,), rigid=rigid,
                          half_res=True)
    det = AffineDetector(config).eval()
    with torch.no_grad():
        for p in det.parameters():
            p.zero_()
        enc = det.enc[0]
        enc.weight[:, 0, 1, 1, 1] = 1.0
        enc.bias[0] = 1.0  # H_0 = P + 1 (P >= 0)
        enc.bias[1:] = -0.1 * torch.arange(1, 11, dtype=torch.float32)
        add = det.add[0]
        for k, level in enumerate(LEVELS):
            j = int(round(level / 0.1))  # R_j = relu(P - level)
            centre = np.zeros(11)
            bias = 0.0
            for jj, w in ((j - 1, 1.0), (j, -2.0), (j + 1, 1.0)):
                coef, const = relu_of_threshold(jj)
                centre += w / HALF_BAND * coef
                bias += w / HALF_BAND * const
            above, above_const = relu_of_threshold(j + 1)
            add.weight[k] -= torch.as_tensor(GAIN * above, dtype=torch.float32)[:, None, None,
                                                                                None]
            add.weight[k, :, 1, 1, 1] += torch.as_tensor(centre, dtype=torch.float32)
            add.bias[k] = bias - GAIN * 27 * above_const
        det.out.weight[:, :, 1, 1, 1] = torch.eye(n)
    return det


def lia_centred_to_ras(centre: np.ndarray, cen: np.ndarray) -> np.ndarray:
    """World points of centred network coordinates (``index - (e - 1) / 2``) on the 1 mm
    LIA network grid whose voxel ``e / 2`` sits at ``centre``."""
    return (cen - 0.5) @ LIA.T + centre


def read_lta(path: Path) -> tuple[np.ndarray, dict[str, tuple[int, ...]]]:
    """The 4x4 matrix of a one-transform LTA file (type must be RAS2RAS) and the shapes of
    its ``src`` and ``dst`` volumes, parsed here."""
    text = path.read_text()
    assert re.search(r"^type\s*=\s*1\b", text, re.M), "LTA is not LINEAR_RAS_TO_RAS"
    lines = [line.strip() for line in text.splitlines()]
    start = lines.index("1 4 4") + 1
    matrix = np.array([[float(v) for v in lines[start + r].split()] for r in range(4)])
    shapes, block = {}, None
    for line in lines:
        if line.endswith("volume info"):
            block = line.split()[0]
        elif block and line.startswith("volume"):
            shapes[block] = tuple(int(v) for v in line.split("=")[1].split())
    return matrix, shapes


def errors(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(got) - expected, axis=1)


# --------------------------------------------------------------------------- cases
FIX_SHAPE = (100, 104, 96)
FIX_AFFINE = grid_affine(np.diag([2.0, 2.0, 2.0]), FIX_SHAPE, FIX_CENTRE)
MOV_SHAPE = (124, 120, 128)
OBLIQUE = Rotation.from_rotvec(np.deg2rad([9.0, -12.0, 15.0])).as_matrix()

CASES = {
    # name: (mode, T fixed->moving world, moving vox2ras 3x3)
    "affine-ras": ("affine", motion([4.0, -6.0, 7.0], [9.0, -7.0, 5.0], [1.06, 0.95, 1.02]),
                   np.diag([1.5, 1.5, 1.5])),
    "rigid-ras": ("rigid", motion([-7.0, 5.0, 6.0], [-8.0, 6.0, 7.0]),
                  np.diag([1.5, 1.5, 1.5])),
    "affine-lps": ("affine", motion([6.0, 7.0, -4.0], [-6.0, -9.0, 8.0], [0.96, 1.04, 1.0]),
                   np.diag([-1.5, -1.5, 1.5])),
    "rigid-oblique": ("rigid", motion([5.0, 6.0, -7.0], [7.0, 8.0, -6.0]),
                      OBLIQUE @ np.diag([1.6, 1.5, 1.4])),
}


def case_images(name: str):
    mode, t, linear = CASES[name]
    moved = apply(t, CENTRES)
    mov_affine = grid_affine(linear, MOV_SHAPE, apply(t, FIX_CENTRE[None])[0] + [3, -2, 4])
    moving = blob_image(MOV_SHAPE, mov_affine, moved)
    fixed = blob_image(FIX_SHAPE, FIX_AFFINE, CENTRES)
    return mode, t, moved, moving, fixed


def case_detector(name: str) -> AffineDetector:
    """The hand-built detector for a case; rigid either built so or switched with
    ``dataclasses.replace`` (as the weights loader does)."""
    mode = CASES[name][0]
    if name == "rigid-ras":
        det = hand_detector(rigid=False)
        det.config = dataclasses.replace(det.config, rigid=True)
        return det
    return hand_detector(rigid=mode == "rigid")


@pytest.fixture(scope="module")
def registered():
    """Run each case once: ``{name: (T, moved centres, moving img, fixed img, result)}``."""
    cache = {}

    def get(name):
        if name not in cache:
            mode, t, moved, moving, fixed = case_images(name)
            result = register(moving, fixed, Models(affine=case_detector(name)), mode=mode,
                              extent=EXTENT)
            cache[name] = (t, moved, moving, fixed, result)
        return cache[name]

    return get


# --------------------------------------------------------------------------- tests
def test_detector_channels_find_their_blobs():
    """Sanity check of the hand-built detector on a scene in network space: channel k's
    barycentre is blob k, and the channels barely overlap."""
    centre = FIX_CENTRE + [2.0, -3.0, 1.0]
    half = np.stack(np.meshgrid(*[np.arange(0, EXTENT, 2.0)] * 3, indexing="ij"), -1)
    world = lia_centred_to_ras(centre, half.reshape(-1, 3) - (EXTENT - 1) / 2)
    vol = torch.zeros((EXTENT,) * 3)
    # only the voxels the detector sees at half resolution are filled; 1 mm anti-aliasing
    vol[::2, ::2, ::2] = torch.as_tensor(scene(world, CENTRES, 1.0).reshape((EXTENT // 2,) * 3),
                                         dtype=torch.float32)
    assert float(vol.max()) == pytest.approx(1.0)
    with torch.no_grad():
        out = hand_detector()(vol[None, None], vol[None, None])
    feat = out.feat_1[0]
    assert feat.shape == (len(LEVELS), 48, 48, 48)
    # x[::2] keeps full-resolution voxels 2j, which the barycentre grid puts at 2j + 0.5
    got = lia_centred_to_ras(centre, out.cen_1[0].numpy() - 0.5)
    err = errors(got, CENTRES)
    assert err.max() < CHANNEL_TOL, f"barycentres off by {np.round(err, 2)} mm"
    # each channel's mass sits on its own blob: under 1 % of it closer to another blob
    # (without the suppression term 11 to 20 % of channels 0-2 sit on brighter blobs)
    cells = np.stack(np.meshgrid(*[np.arange(48.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    cell_world = lia_centred_to_ras(centre, 4 * cells - 94.0)
    nearest = np.argmin(np.linalg.norm(cell_world[:, None] - CENTRES[None], axis=2), 1)
    for k in range(len(LEVELS)):
        mass = feat[k].flatten().double().numpy()
        assert mass.sum() > 5, f"channel {k} is empty"
        assert mass[nearest != k].sum() < 0.01 * mass.sum(), f"channel {k} leaks"
    # the fit between identical inputs is the identity
    assert np.allclose(out.matrix[0].numpy(), np.eye(4), atol=1e-6)
    # the detector's own convention: ``matrix`` maps centred fixed (input 2) coordinates to
    # moving (input 1) ones; content moved by whole pooling cells moves every map exactly
    shift = (8, -4, 12)
    with torch.no_grad():
        out = hand_detector()(torch.roll(vol, shift, (0, 1, 2))[None, None], vol[None, None])
    expected = np.eye(4)
    expected[:3, 3] = shift
    # up to float32 rounding of the features: convolution kernels need not round alike
    # at every position (on an AVX2 CPU the shift came out 1e-3 voxels short; the other
    # convention would be off by twice the shift)
    assert np.allclose(out.matrix[0].numpy(), expected, atol=5e-3)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_maps_fixed_to_moving(registered, name):
    """``forward`` takes each fixed blob centre to the moving blob, ``inverse`` back."""
    t, moved, _, _, result = registered(name)
    # the motion is large compared with the tolerance, so a wrong direction cannot pass
    assert errors(moved, CENTRES).min() > 8
    assert errors(apply(np.linalg.inv(t), CENTRES), moved).min() > 15
    fw = errors(result.forward.map(CENTRES), moved)
    bw = errors(result.inverse.map(moved), CENTRES)
    assert fw.max() < POINT_TOL, f"forward off by {np.round(fw, 2)} mm"
    assert bw.max() < POINT_TOL, f"inverse off by {np.round(bw, 2)} mm"
    fw_mat = result.forward.as_affine().matrix
    assert np.allclose(fw_mat @ result.inverse.as_affine().matrix, np.eye(4), atol=1e-6)
    if result.mode == "rigid":
        lin = fw_mat[:3, :3]
        assert np.allclose(lin.T @ lin, np.eye(3), atol=1e-6)
        assert np.linalg.det(lin) == pytest.approx(1.0, abs=1e-6)
    # the linear part too: the rotation/scale of T, not of inv(T)
    assert np.abs(fw_mat[:3, :3] - t[:3, :3]).max() < LINEAR_TOL


@pytest.mark.parametrize("name", ["affine-ras", "rigid-oblique"])
def test_written_transforms_keep_direction(registered, name, tmp_path):
    """``-t`` as written to disk: ITK ``.txt`` read by SimpleITK (LPS), ``.lta`` read by
    nitransforms and parsed here (push-forward, moving -> fixed)."""
    t, moved, moving, fixed, result = registered(name)
    txt = tmp_path / "fw.txt"
    save_transform(txt, result.forward)
    tx = sitk.ReadTransform(str(txt))
    got = np.array([tx.TransformPoint(tuple(p * FLIP)) for p in CENTRES]) * FLIP
    err = errors(got, moved)
    assert err.max() < POINT_TOL, f"ITK .txt off by {np.round(err, 2)} mm"

    lta = tmp_path / "fw.lta"
    save_transform(lta, result.forward, source=ImageGrid.from_image(moving),
                   reference=ImageGrid.from_image(fixed))
    err = errors(np.asarray(nt_linear_load(str(lta), fmt="fs").map(CENTRES)), moved)
    assert err.max() < POINT_TOL, f"LTA via nitransforms off by {np.round(err, 2)} mm"
    matrix, shapes = read_lta(lta)
    assert shapes == {"src": moving.shape, "dst": fixed.shape}  # src = moving, dst = fixed
    err = errors(apply(matrix, moved), CENTRES)  # push-forward: moving -> fixed
    assert err.max() < POINT_TOL, f"LTA matrix off by {np.round(err, 2)} mm"
