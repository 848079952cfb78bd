"""Label maps to synthesise training images from.

Two sources, both made from what the installed packages ship, so that anyone can
retrain without third-party scans or segmentations:

* :func:`random_shapes`: random geometric shapes from smooth (Perlin-like) noise, as
  SynthMorph's *sm-shapes* training data.
* :func:`template_labels`: brain labels derived from the symmetric ICBM152 2009a
  nonlinear template bundled with nilearn (its T1 image, GM and WM probability maps and
  brain mask), optionally subdivided by hemisphere and by template intensity, and
  optionally surrounded by a synthetic head (extra-cerebral CSF, skull, scalp).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..ops.grid import voxel_grid
from ..ops.sampling import sample_nearest

__all__ = ["perlin_noise", "random_shapes", "template_labels", "TEMPLATE_NAME"]

#: What :func:`template_labels` is derived from (nilearn's ``load_mni152_*`` files).
TEMPLATE_NAME = "ICBM152 2009a nonlinear symmetric (nilearn)"

# Intensity clusters per tissue when subdividing (ordered dark to bright).
_CLUSTERS = {"csf": 2, "gm": 3, "wm": 2}
_HEAD_LAYERS = ("extracerebral_csf", "skull", "scalp")
# Mean thickness range (mm) of each head layer, drawn per call.
_HEAD_THICKNESS = ((1.5, 4.0), (4.0, 8.0), (4.0, 9.0))

GeneratorLike = torch.Generator | int | None


def _as_generator(generator: GeneratorLike) -> torch.Generator | None:
    if isinstance(generator, (int, np.integer)):
        return torch.Generator().manual_seed(int(generator))
    return generator


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def perlin_noise(
    shape: Sequence[int],
    scales: Sequence[float] = (8, 16, 32),
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
    *,
    num: int | None = None,
) -> torch.Tensor:
    """Smooth random noise: a sum over scales of upsampled random coarse grids.

    For each scale, a grid of standard-normal values with a spacing of ``scale`` voxels
    is drawn, multiplied by a random amplitude in [0.5, 1) and upsampled (bi/trilinear)
    to ``shape``.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape, 2D or 3D.
    scales : sequence of float
        Voxel spacings of the coarse grids (larger: smoother).
    generator : torch.Generator or int or None
        Random source (an int is a seed). Numbers are drawn on the generator's device
        (CPU when None), so a CPU generator gives the same noise on every device.
    device : torch.device or str, optional
        Device of the result (default: CPU).
    num : int, optional
        If given, return ``num`` independent volumes stacked as ``(num, *shape)``.

    Returns
    -------
    torch.Tensor
        float32 noise of shape ``shape`` (or ``(num, *shape)``).

    Examples
    --------
    >>> n = perlin_noise((20, 24, 16), scales=(4, 8), generator=0)
    >>> tuple(n.shape), n.dtype
    ((20, 24, 16), torch.float32)
    >>> bool(torch.equal(n, perlin_noise((20, 24, 16), scales=(4, 8), generator=0)))
    True
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"perlin_noise needs a 2D or 3D shape, got {shape}")
    if not scales:
        raise ValueError("perlin_noise needs at least one scale")
    gen = _as_generator(generator)
    gdev = _gen_device(gen)
    device = torch.device("cpu") if device is None else torch.device(device)
    count = 1 if num is None else int(num)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    out = torch.zeros((1, count, *shape), device=device)
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"noise scales must be positive, got {scale}")
        coarse = [max(2, math.ceil((s - 1) / scale) + 1) for s in shape]
        grid = torch.randn((1, count, *coarse), generator=gen, device=gdev)
        amp = 0.5 + 0.5 * torch.rand((1, count) + (1,) * len(shape), generator=gen, device=gdev)
        up = F.interpolate((grid * amp).to(device), size=shape, mode=mode, align_corners=True)
        out += up
    out = out[0]
    return out[0] if num is None else out


def _smooth_displacement(
    shape: tuple[int, ...],
    max_disp: float,
    scale: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Smooth random displacement (voxels), shape (*shape, ndim), |u| <~ max_disp."""
    ndim = len(shape)
    u = perlin_noise(shape, (scale,), generator, device, num=ndim)
    u = u / u.abs().amax().clamp_min(1e-6) * max_disp
    return torch.movedim(u, 0, -1)


def random_shapes(
    shape: Sequence[int],
    num_labels: int | tuple[int, int] = (16, 26),
    scales: Sequence[float] = (12, 24, 48),
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
    batch: int = 1,
    *,
    warp: float = 4.0,
    warp_scale: float = 16.0,
) -> torch.Tensor:
    """Random label maps of smooth shapes, as SynthMorph's *sm-shapes*.

    Per map, draw ``n`` smooth noise volumes (:func:`perlin_noise`, each standardised)
    and label every voxel with the index of the largest; then optionally move the labels
    by a smooth random displacement for more irregular boundaries.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape (2D or 3D).
    num_labels : int or (int, int)
        Number of labels ``n``, or an inclusive range to draw it from (per map).
    scales : sequence of float
        Noise scales in voxels (see :func:`perlin_noise`).
    generator : torch.Generator or int or None
        Random source (an int is a seed); see :func:`perlin_noise`.
    device : torch.device or str, optional
        Device of the result (default: CPU).
    batch : int
        Number of maps.
    warp : float
        Largest displacement of the warp in voxels (0: no warp).
    warp_scale : float
        Smoothness (noise scale in voxels) of the warp.

    Returns
    -------
    torch.Tensor
        int64 labels of shape ``(batch, *shape)``; map ``b`` uses labels ``0..n_b-1``.
        Labels that lose every voxel (rare) are dropped and the rest renumbered, so a map
        may have fewer than its drawn ``n`` labels.

    Examples
    --------
    >>> lab = random_shapes((32, 32, 32), num_labels=5, generator=1)
    >>> tuple(lab.shape), lab.dtype, int(lab.max()) <= 4
    ((1, 32, 32, 32), torch.int64, True)
    """
    shape = tuple(int(s) for s in shape)
    gen = _as_generator(generator)
    gdev = _gen_device(gen)
    device = torch.device("cpu") if device is None else torch.device(device)
    if isinstance(num_labels, (int, np.integer)):
        lo = hi = int(num_labels)
    else:
        lo, hi = (int(v) for v in num_labels)
    if not 1 <= lo <= hi:
        raise ValueError(f"num_labels must be >= 1 and ordered, got {num_labels}")
    ndim = len(shape)
    maps = []
    for _ in range(int(batch)):
        n = int(torch.randint(lo, hi + 1, (1,), generator=gen, device=gdev))
        noise = perlin_noise(shape, scales, gen, device, num=n)
        dims = tuple(range(1, ndim + 1))
        noise = (noise - noise.mean(dims, keepdim=True)) / noise.std(dims, keepdim=True)
        lab = noise.argmax(0)
        del noise
        if warp > 0:
            disp = _smooth_displacement(shape, warp, warp_scale, gen, device)
            lab = _warp_nearest(lab, disp)
        # Drop labels that vanished and renumber, keeping labels consecutive.
        present = torch.zeros(n, dtype=torch.bool, device=device)
        present[lab.reshape(-1)] = True
        if not bool(present.all()):
            lab = (torch.cumsum(present.long(), 0) - 1)[lab]
        maps.append(lab)
    return torch.stack(maps)


def _warp_nearest(labels: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Sample ``labels`` (spatial) at ``x + disp(x)`` (voxels), nearest neighbour, the
    points clamped to the grid."""
    hi = torch.tensor([n - 1 for n in labels.shape], device=labels.device)
    points = voxel_grid(labels.shape, device=labels.device) + disp
    return sample_nearest(labels, torch.minimum(points.clamp(min=0), hi))


def _kmeans_1d(values: np.ndarray, k: int, iters: int = 50) -> np.ndarray:
    """Deterministic 1D k-means (quantile start); labels 0..k-1 ordered by centre."""
    if k <= 1 or values.size == 0:
        return np.zeros(values.shape, dtype=np.int64)
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        cuts = (centres[1:] + centres[:-1]) / 2
        assign = np.searchsorted(cuts, values)
        new = np.array([values[assign == j].mean() if np.any(assign == j) else centres[j]
                        for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = np.sort(new)
    return np.searchsorted((centres[1:] + centres[:-1]) / 2, values)


def _load_template(resolution: int):
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    mask = datasets.load_mni152_brain_mask(resolution=resolution)
    return (np.asarray(t1.dataobj, dtype=np.float32), np.asarray(gm.dataobj, dtype=np.float32),
            np.asarray(wm.dataobj, dtype=np.float32), np.asarray(mask.dataobj) > 0,
            np.asarray(t1.affine, dtype=np.float64))


@functools.lru_cache(maxsize=4)
def _brain_labels(resolution: int, subdivide: bool):
    """Cached no-head labels (read-only), affine, names (tuple of pairs)."""
    t1, gm, wm, brain, affine = _load_template(resolution)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0) + 1  # 1 csf, 2 gm, 3 wm
    tissue[~brain] = 0
    labels = np.zeros(brain.shape, dtype=np.uint8)
    names = {0: "background"}
    if not subdivide:
        labels[...] = tissue
        names.update({1: "csf", 2: "gm", 3: "wm"})
    else:
        # World x (RAS) of every voxel centre: left hemisphere is x < 0.
        ijk = np.indices(brain.shape, dtype=np.float64)
        x = np.tensordot(affine[0, :3], ijk, axes=1) + affine[0, 3]
        left = x < 0
        cluster = np.zeros(brain.shape, dtype=np.int64)
        for t, tname in enumerate(("csf", "gm", "wm"), start=1):
            sel = tissue == t
            cluster[sel] = _kmeans_1d(t1[sel].astype(np.float64), _CLUSTERS[tname])
        next_label = 1
        for side, in_side in (("left", left), ("right", ~left)):
            for t, tname in enumerate(("csf", "gm", "wm"), start=1):
                for j in range(_CLUSTERS[tname]):
                    labels[(tissue == t) & in_side & (cluster == j)] = next_label
                    names[next_label] = f"{side}_{tname}_{j + 1}"
                    next_label += 1
    labels.setflags(write=False)
    affine.setflags(write=False)
    return labels, affine, tuple(names.items())


def _add_head(labels: np.ndarray, affine: np.ndarray, generator: GeneratorLike,
              first_label: int) -> dict[int, str]:
    """Fill shells of random, smoothly varying thickness around the brain (in place)."""
    from scipy import ndimage

    gen = _as_generator(generator)
    gdev = _gen_device(gen)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    brain = labels > 0
    dist = ndimage.distance_transform_edt(~brain, sampling=spacing)  # mm to the brain
    # Only voxels within reach of the thickest possible head need the noise fields.
    reach = sum(hi for _, hi in _HEAD_THICKNESS) * 1.5
    near = (dist > 0) & (dist <= reach)
    lows = torch.tensor([lo for lo, _ in _HEAD_THICKNESS])
    highs = torch.tensor([hi for _, hi in _HEAD_THICKNESS])
    base = lows + (highs - lows) * torch.rand(len(_HEAD_THICKNESS), generator=gen, device=gdev)
    noise = perlin_noise(labels.shape, (20.0 / float(spacing.min()),), gen, num=len(base))
    noise = noise / noise.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None]
    thick = base.cpu()[:, None, None, None] * (1 + 0.4 * torch.tanh(noise))
    thick = thick.clamp_min(float(spacing.max())).numpy()
    edges = np.cumsum(thick[:, near], axis=0)
    d = dist[near]
    layer = np.full(d.shape, -1, dtype=np.int64)
    for i in reversed(range(len(base))):
        layer[d <= edges[i]] = i
    values = labels[near]
    values[layer >= 0] = first_label + layer[layer >= 0]
    labels[near] = values
    return {first_label + i: name for i, name in enumerate(_HEAD_LAYERS)}


def template_labels(
    resolution: int = 2,
    *,
    head: bool = False,
    subdivide: bool = True,
    generator: GeneratorLike = None,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Brain label map derived from nilearn's ICBM152 2009a symmetric template.

    Inside nilearn's brain mask (template T1 > 0.2), each voxel gets the most probable
    of CSF (``1 - p_GM - p_WM``), GM and WM from the template's probability maps;
    outside it is background (0). With ``subdivide``, each tissue is split by hemisphere
    (world x < 0 is left) and into intensity clusters of the template T1 (1D k-means,
    CSF 2, GM 3, WM 2 clusters, numbered dark to bright), giving 14 brain labels such as
    ``"left_gm_1"``. With ``head``, synthetic extra-cerebral CSF, skull and scalp
    surround the brain as shells whose thickness varies smoothly at random.

    Parameters
    ----------
    resolution : {1, 2}
        Template resolution in mm.
    head : bool
        Add the synthetic non-brain head layers (outside the brain mask only).
    subdivide : bool
        Split tissues by hemisphere and intensity cluster (else labels csf, gm, wm).
    generator : torch.Generator or int or None
        Random source for the head layers (an int is a seed); unused without ``head``.

    Returns
    -------
    labels : numpy.ndarray
        uint8 label map, same grid as ``nilearn.datasets.load_mni152_template``.
    affine : numpy.ndarray
        4x4 voxel-to-world (RAS, mm) matrix of that grid.
    names : dict of int to str
        Name of every label in the map (0 is ``"background"``).

    Examples
    --------
    >>> lab, aff, names = template_labels(2, subdivide=False)
    >>> lab.shape, sorted(names.values())
    ((99, 117, 95), ['background', 'csf', 'gm', 'wm'])
    """
    if int(resolution) not in (1, 2):
        raise ValueError(f"template resolution must be 1 or 2 mm, got {resolution}")
    base, affine, names_t = _brain_labels(int(resolution), bool(subdivide))
    labels = base.copy()
    names = dict(names_t)
    if head:
        names.update(_add_head(labels, np.array(affine), generator, max(names) + 1))
    return labels, np.array(affine), names
