"""Interpolation of volumes and vector fields at arbitrary voxel coordinates.

Coordinates are zero-based voxel indices in array order ``(i, j, k)``. Two boundary
rules are offered, the two that SynthMorph uses:

``"zeros"``
    A point with any coordinate below 0 or above ``n - 1`` gets ``fill``; inside, the
    eight neighbours are clamped to the grid, so a point exactly on the last voxel keeps
    its full weight. This is how images are resampled (differs from
    ``torch.nn.functional.grid_sample``, which blends with zero at the border).
``"clamp"``
    Coordinates are clamped to ``[0, n - 1]`` first (edge replication). This is how
    displacement fields are interpolated.

A third rule is ITK's, for resampling that users compare with ITK, ANTs or SimpleITK:

``"itk"``
    A point is inside when every coordinate lies in ``[-0.5, n - 0.5)`` (the voxels'
    extent, not their centres); inside, neighbours are clamped to the grid, so the half
    voxel beyond the last centre repeats the edge value; outside gets ``fill``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .grid import to_grid_sample

CHUNK = 1 << 22


def _prepare(vol: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int], bool]:
    squeeze = vol.ndim == 3
    if squeeze:
        vol = vol[..., None]
    if vol.ndim != 4:
        raise ValueError(f"expected a (X, Y, Z[, C]) volume, got shape {tuple(vol.shape)}")
    shape = tuple(int(s) for s in vol.shape[:3])
    return vol.reshape(-1, vol.shape[-1]), shape, squeeze


#: fewest points a ``grid_sample`` call splits across threads (below it the split costs more)
SPLIT_POINTS = 1 << 15


def grid_sample(inp: torch.Tensor, grid: torch.Tensor, **kwargs) -> torch.Tensor:
    """``torch.nn.functional.grid_sample`` of a single volume on all of torch's threads.

    On a CPU, PyTorch's 3-D sampler runs one thread per batch item, so a lone volume uses
    one core. Here the points of a batch of one are dealt to ``torch.get_num_threads()``
    batch items that all read the same volume (``expand``: no copy); each point is still
    computed by the same kernel, so the values are the same, bit for bit, and gradients
    flow as usual (the expanded volume's sum back to one).

    >>> vol = torch.rand(1, 2, 5, 6, 7)
    >>> g = torch.rand(1, 40, 41, 1, 3) * 2 - 1
    >>> torch.equal(grid_sample(vol, g, align_corners=True),
    ...             F.grid_sample(vol, g, align_corners=True))
    True
    """
    threads = torch.get_num_threads()
    points = grid[0, ..., 0].numel()
    if (inp.shape[0] != 1 or inp.device.type != "cpu" or threads < 2
            or points < max(SPLIT_POINTS, threads)):
        return F.grid_sample(inp, grid, **kwargs)
    per = -(-points // threads)  # ceil: the last item is padded with repeats of point 0
    flat = grid.reshape(-1, 3)
    if per * threads > points:
        flat = torch.cat([flat, flat[:1].expand(per * threads - points, 3)])
    out = F.grid_sample(inp.expand(threads, *inp.shape[1:]), flat.view(threads, per, 1, 1, 3),
                        **kwargs)  # (threads, C, per, 1, 1)
    out = out.reshape(threads, -1, per).transpose(0, 1).reshape(inp.shape[1], -1)[:, :points]
    return out.reshape(1, inp.shape[1], *grid.shape[1:4])


def _outside(p: torch.Tensor, hi: torch.Tensor, boundary: str) -> torch.Tensor | None:
    """Points that get ``fill`` under ``boundary`` (None: none do)."""
    if boundary == "zeros":
        return ((p < 0) | (p > hi)).any(dim=-1)
    if boundary == "itk":
        return ((p < -0.5) | (p >= hi + 0.5)).any(dim=-1)
    return None


def _linear_grid_sample(vol: torch.Tensor, pts: torch.Tensor, boundary: str,
                        fill: float) -> torch.Tensor:
    """``sample_linear`` on ``grid_sample`` (differentiable, any device): ``(N, C)``."""
    inp = vol.permute(3, 0, 1, 2)[None]  # (1, C, X, Y, Z)
    hi = torch.tensor([n - 1 for n in vol.shape[:3]], dtype=torch.float64, device=vol.device)
    out = torch.empty((pts.shape[0], vol.shape[3]), dtype=vol.dtype, device=vol.device)
    for start in range(0, pts.shape[0], CHUNK):
        p = pts[start:start + CHUNK].to(vol.device, torch.float64)
        grid = to_grid_sample(p, vol.shape[:3]).to(vol.dtype)  # normalised in float64
        res = grid_sample(inp, grid.view(1, 1, 1, -1, 3), mode="bilinear",
                          padding_mode="border", align_corners=True)
        res = res.view(vol.shape[3], -1).T
        outside = _outside(p, hi, boundary)
        if outside is not None:
            res[outside] = fill
        out[start:start + CHUNK] = res
    return out


GATHER_CHUNK = 1 << 19  # points per pass of the gathering sampler: its temporaries stay in cache


def _linear_gather(vol: torch.Tensor, pts: torch.Tensor, boundary: str,
                   fill: float) -> torch.Tensor:
    """``sample_linear`` of one channel ``(X, Y, Z)`` by gathering the eight neighbours
    (CPU, no autograd): ``(N,)``.

    The weights come straight from the voxel coordinates (``c - floor(c)``, exact in
    their dtype), with no normalisation to ``[-1, 1]`` and back, and the interpolation is
    three rounds of ``lerp``. On a CPU this is faster than ``grid_sample`` for one
    channel (about 1.3x at 256^3, 2 threads); for vector fields ``grid_sample``, whose
    cost is per point, not per channel, stays ahead."""
    shape = vol.shape
    flat = vol.reshape(-1)
    hi = torch.tensor([n - 1 for n in shape], dtype=pts.dtype)
    top = torch.tensor([max(n - 2, 0) for n in shape], dtype=pts.dtype)
    stride = (shape[1] * shape[2], shape[2], 1)
    s0, s1, s2 = (stride[a] if shape[a] > 1 else 0 for a in range(3))  # 1 voxel: no step
    out = torch.empty(pts.shape[0], dtype=vol.dtype)
    for start in range(0, pts.shape[0], GATHER_CHUNK):
        p = pts[start:start + GATHER_CHUNK]
        c = torch.minimum(p.nan_to_num(0.0).clamp(min=0), hi)  # NaN: voxel 0, no crash
        lo = torch.minimum(c.floor(), top)  # the last voxel is reached with weight 1
        w = (c - lo).to(vol.dtype).T
        lo = lo.long()
        base = lo[:, 0] * stride[0] + lo[:, 1] * stride[1] + lo[:, 2]
        v = [flat.take(base + o) if o else flat.take(base) for o in
             (0, s2, s1, s1 + s2, s0, s0 + s2, s0 + s1, s0 + s1 + s2)]
        lower = torch.lerp(torch.lerp(v[0], v[1], w[2]), torch.lerp(v[2], v[3], w[2]), w[1])
        upper = torch.lerp(torch.lerp(v[4], v[5], w[2]), torch.lerp(v[6], v[7], w[2]), w[1])
        res = torch.lerp(lower, upper, w[0])
        outside = _outside(p, hi, boundary)
        if outside is not None:
            res[outside] = fill
        out[start:start + GATHER_CHUNK] = res
    return out


def sample_linear(
    vol: torch.Tensor,
    coords: torch.Tensor,
    *,
    boundary: str = "zeros",
    fill: float = 0.0,
) -> torch.Tensor:
    """Trilinearly interpolate ``vol`` (X, Y, Z[, C]) at ``coords`` (..., 3).

    Returns an array of shape ``coords.shape[:-1] (+ (C,))`` in ``vol``'s (floating) dtype.
    One channel on a CPU without autograd: the eight neighbours are gathered directly;
    otherwise it runs on ``torch.nn.functional.grid_sample`` with border padding (which clamps the
    sample point to the grid). The ``"zeros"`` and ``"itk"`` rules then fill the points
    off the grid.

    >>> v = torch.arange(8.0).reshape(2, 2, 2)
    >>> sample_linear(v, torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [1.2, 0, 0]]))
    tensor([3.5000, 7.0000, 0.0000])
    >>> sample_linear(v, torch.tensor([[1.2, 0.0, 0.0]]), boundary="clamp")
    tensor([4.])
    >>> sample_linear(v, torch.tensor([[1.2, 0, 0], [1.5, 0, 0], [-0.5, 0, 0]]),
    ...               boundary="itk", fill=-1)
    tensor([ 4., -1.,  0.])
    """
    if boundary not in ("zeros", "clamp", "itk"):
        raise ValueError(f"unknown boundary rule {boundary!r}")
    squeeze = vol.ndim == 3
    if squeeze:
        vol = vol[..., None]
    if vol.ndim != 4:
        raise ValueError(f"expected a (X, Y, Z[, C]) volume, got shape {tuple(vol.shape)}")
    if not vol.is_floating_point():
        vol = vol.float()
    lead = coords.shape[:-1]
    pts = coords.reshape(-1, 3)
    tracked = torch.is_grad_enabled() and (vol.requires_grad or coords.requires_grad)
    if vol.shape[3] == 1 and not tracked and vol.device.type == pts.device.type == "cpu":
        if not pts.is_floating_point():
            pts = pts.double()
        out = _linear_gather(vol[..., 0].contiguous(), pts, boundary, fill)[:, None]
    else:
        out = _linear_grid_sample(vol, pts, boundary, fill)
    out = out.reshape(*lead, vol.shape[3])
    return out[..., 0] if squeeze else out


def axis_permutation(matrix, shape) -> tuple[int, int, int] | None:
    """For a voxel-to-voxel ``matrix`` (4x4 or 3x4) whose output axes each move along one
    input axis only (a scaling, flip or axis permutation plus a shift, as between two
    grids with parallel axes), the input axis of each output axis; else None. Terms that
    move a point of a grid of ``shape`` by less than 1e-6 voxel count as zero.

    >>> axis_permutation([[0, 0, 2, 1], [1, 0, 0, 0], [0, -1, 0, 5]], (8, 8, 8))
    (1, 2, 0)
    >>> axis_permutation([[1, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], (8, 8, 8)) is None
    True
    """
    lin = np.abs(np.asarray(matrix, np.float64)[:3, :3]) * np.asarray(shape, np.float64)
    on = lin > 1e-6
    if not (on.sum(axis=0) == 1).all() or not (on.sum(axis=1) == 1).all():
        return None
    return tuple(int(np.flatnonzero(on[:, b])[0]) for b in range(3))


def resample_axis_aligned(vol: torch.Tensor, matrix, shape) -> torch.Tensor:
    """``sample_linear(vol, affine_points(matrix, shape), boundary="zeros")`` for a matrix
    :func:`axis_permutation` accepts, by :func:`sample_separable`. The coordinates along
    each axis are those :func:`~synthmorph_nipype.ops.grid.affine_points` gives (the
    matrix cast to float32).

    >>> v = torch.arange(24.0).reshape(2, 3, 4)
    >>> m = [[0, 0, 0.5, 0], [1, 0, 0, 0.25], [0, 1, 0, -0.5]]
    >>> out = resample_axis_aligned(v, m, (3, 2, 3))
    >>> from .grid import affine_points
    >>> torch.allclose(out, sample_linear(v, affine_points(torch.tensor(m), (3, 2, 3))))
    True
    """
    perm = axis_permutation(matrix, shape)
    if perm is None:
        raise ValueError("the matrix mixes axes: not an axis-aligned resampling")
    return sample_separable(vol, axis_coordinates(matrix, shape, perm), perm)


def axis_coordinates(matrix, shape, perm) -> list[torch.Tensor]:
    """For an axis-aligned ``matrix`` (:func:`axis_permutation` gives ``perm``), the
    input coordinate along axis ``perm[b]`` of each index along output axis ``b``, in
    float32 as :func:`~synthmorph_nipype.ops.grid.affine_points` computes it."""
    m = torch.as_tensor(np.asarray(matrix, np.float64)[:3], dtype=torch.float32)
    return [torch.arange(int(shape[b]), dtype=torch.float32) * m[a, b] + m[a, 3]
            for b, a in enumerate(perm)]


def sample_separable(vol: torch.Tensor, coords: list[torch.Tensor], perm, *,
                     boundary: str = "zeros") -> torch.Tensor:
    """``sample_linear`` of ``vol`` ``(X, Y, Z[, C])`` on a grid whose points have, along
    input axis ``perm[b]``, a coordinate that depends on the index along output axis
    ``b`` only (``coords[b]``, 1-D): three 1-D interpolations (trilinear weights are the
    product of one linear weight per axis), a few passes over the volume instead of
    eight reads per output voxel, each a product with a two-band matrix. ``boundary``:
    ``"zeros"`` (a point off the grid along any axis is 0; those rows are not computed)
    or ``"clamp"``. Weights in float64, sums in ``vol``'s dtype; returns
    ``(len(coords[0]), len(coords[1]), len(coords[2])[, C])``.

    >>> v = torch.arange(8.0).reshape(2, 2, 2)
    >>> c = [torch.tensor([-1.0, 0.5]), torch.tensor([0.0]), torch.tensor([1.0, 3.0])]
    >>> sample_separable(v, c, (0, 1, 2), boundary="clamp")[:, 0]
    tensor([[1., 1.],
            [3., 3.]])
    """
    if boundary not in ("zeros", "clamp"):
        raise ValueError(f"unknown boundary rule {boundary!r}")
    shape = tuple(len(c) for c in coords)
    out, block = vol, []
    for b, a in enumerate(perm):  # output axis b reads input axis a
        n = vol.shape[a]
        p = coords[b].to(vol.device).double()
        if boundary == "clamp":
            p = p.clamp(0, n - 1)
            block.append(slice(0, shape[b]))
        else:
            on = torch.nonzero((p >= 0) & (p <= n - 1)).flatten()  # linear: one run
            if not len(on):  # off the grid along one axis: zero whatever the others
                return vol.new_zeros(shape + tuple(vol.shape[3:]))
            block.append(slice(int(on[0]), int(on[-1]) + 1))
            p = p[block[-1]]  # only the rows on the grid are computed; the others stay 0
        lo = p.floor().clamp(0, n - 1)
        frac = p - lo
        lo = lo.long()
        rows = torch.arange(len(p), device=p.device)
        weights = torch.zeros(len(p), n, dtype=torch.float64, device=p.device)
        weights[rows, lo] += 1 - frac  # a two-band matrix: linear interpolation
        weights[rows, (lo + 1).clamp(max=n - 1)] += frac
        out = torch.tensordot(weights.to(vol.dtype), out, dims=([1], [a])).movedim(0, a)
    out = out.permute(*perm, *range(3, vol.ndim))  # axis perm[b] runs along output axis b
    if boundary == "clamp":
        return out.contiguous()
    full = vol.new_zeros(shape + tuple(vol.shape[3:]))
    full[tuple(block)] = out
    return full


def sample_nearest(vol: torch.Tensor, coords: torch.Tensor, *, fill: float = 0.0) -> torch.Tensor:
    """Nearest-neighbour lookup; points whose nearest voxel is off the grid get ``fill``.

    Values are copied, never blended, so label maps keep their labels exactly.

    >>> v = torch.tensor([[[1, 2]], [[3, 4]]])
    >>> sample_nearest(v, torch.tensor([[0.6, 0.0, 0.4], [0.0, 0.0, 1.7]]), fill=-1)
    tensor([ 3, -1])
    """
    flat, shape, squeeze = _prepare(vol)
    lead = coords.shape[:-1]
    pts = coords.reshape(-1, 3)
    out = torch.empty((pts.shape[0], flat.shape[1]), dtype=flat.dtype, device=flat.device)
    strides = (shape[1] * shape[2], shape[2], 1)
    for start in range(0, pts.shape[0], CHUNK):
        idx = torch.floor(pts[start:start + CHUNK].to(flat.device) + 0.5).long()
        inside = torch.ones(idx.shape[0], dtype=torch.bool, device=flat.device)
        index = torch.zeros(idx.shape[0], dtype=torch.long, device=flat.device)
        for a in range(3):
            inside &= (idx[:, a] >= 0) & (idx[:, a] <= shape[a] - 1)
            index += idx[:, a].clamp(0, shape[a] - 1) * strides[a]
        vals = flat[index]
        vals[~inside] = torch.as_tensor(fill, dtype=flat.dtype)
        out[start:start + CHUNK] = vals
    out = out.reshape(*lead, flat.shape[1])
    return out[..., 0] if squeeze else out
