"""Image similarity objectives (VoxelMorph-style training and test-time refinement).

Unlike the label objectives of :mod:`synthmorph_nipype.training.losses`, these compare
intensities, so they work on a user's own images. Each takes channels-first batches
``(B, 1, X, Y, Z)`` and returns a scalar *loss* (lower is better): local normalised
cross-correlation for one contrast, MSE for intensity-matched images, and MIND
(modality-independent neighbourhood descriptors) or mutual information across contrasts.
With ``weight`` (a ``(B, 1, X, Y, Z)`` map, e.g. a brain mask, as ANTs' ``-x``) the loss is
the weighted mean over voxels: voxels of weight 0 do not count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a ``window``-wide cube around each voxel (zero outside), axis by axis as
    ``window`` shifted views of the zero-padded volume added up: on a CPU 2-3 times
    faster than grouped 1-D convolutions (and those several times faster than
    ``avg_pool3d``), forward and back.

    >>> x = torch.rand(1, 2, 5, 4, 3)
    >>> ref = 27 * F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=True)
    >>> bool(torch.allclose(_box_sum(x, 3), ref, atol=1e-5))
    True
    """
    r = window // 2
    for axis in range(3):
        dim, n = 2 + axis, x.shape[2 + axis]
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        padded = F.pad(x, pad)
        x = padded.narrow(dim, 0, n).clone()
        for k in range(1, window):
            x.add_(padded.narrow(dim, k, n))
    return x


def _local_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window``-wide cube around each voxel (the cube is cut at the edges).

    >>> x = torch.rand(1, 2, 7, 6, 5)
    >>> ref = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    >>> bool(torch.allclose(_local_mean(x, 3), ref, atol=1e-6))
    True
    """
    r = window // 2
    count = 1.0
    for axis, n in enumerate(x.shape[2:]):  # voxels of the cube inside the grid, per axis
        i = torch.arange(n, device=x.device)
        c = (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(x.dtype)
        count = count * c.view([-1 if a == axis else 1 for a in range(3)])
    return _box_sum(x, window) / count


def _mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of voxel-wise ``values`` ``(B, C, ...)`` over channels and voxels, weighted by
    ``weight`` ``(B, 1, ...)`` when given (0 where the weights sum to 0).

    >>> v = torch.tensor([1.0, 3.0]).view(1, 1, 2, 1, 1)
    >>> float(_mean(v, None)), float(_mean(v, torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1)))
    (2.0, 3.0)
    """
    if weight is None:
        return values.mean()
    w = weight.to(values.dtype).expand_as(values[:, :1])
    total = w.sum() * values.shape[1]
    return (values * w).sum() / total.clamp_min(1e-12)


def local_ncc(moved: torch.Tensor, fixed: torch.Tensor, window: int = 9,
              eps: float = 1e-5, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative mean local squared correlation coefficient over cubes of ``window**3`` voxels
    (VoxelMorph's NCC): -1 for images that agree up to a local linear intensity map.

    >>> x = torch.rand(1, 1, 12, 12, 12)
    >>> round(float(local_ncc(x, 3 * x + 1, window=5)), 4)
    -1.0
    """
    if window % 2 == 0:
        raise ValueError(f"the NCC window must be odd, got {window}")
    mu_m, mu_f = _local_mean(moved, window), _local_mean(fixed, window)
    size = float(window**3)  # window sums, as VoxelMorph: eps stays small next to them
    cross = size * (_local_mean(moved * fixed, window) - mu_m * mu_f)
    var_m = size * (_local_mean(moved * moved, window) - mu_m**2).clamp_min(0)
    var_f = size * (_local_mean(fixed * fixed, window) - mu_f**2).clamp_min(0)
    cc = cross * cross / (var_m * var_f + eps)
    return -_mean(cc, weight)


def image_mse(moved: torch.Tensor, fixed: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference (images on one intensity scale).

    >>> float(image_mse(torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)))
    1.0
    """
    return _mean((moved - fixed) ** 2, weight)


def _shift(x: torch.Tensor, axis: int, step: int) -> torch.Tensor:
    """``x`` moved by ``step`` voxels along spatial ``axis`` (edge values replicated)."""
    pad = [0, 0, 0, 0, 0, 0]
    side = 2 * (2 - axis) + (0 if step > 0 else 1)
    pad[side] = abs(step)
    padded = F.pad(x, pad, mode="replicate")
    n = x.shape[2 + axis]
    start = 0 if step > 0 else abs(step)
    return padded.narrow(2 + axis, start, n)


def mind(x: torch.Tensor, distance: int = 2, patch: int = 3, eps: float = 1e-6
         ) -> torch.Tensor:
    """MIND descriptors ``(B, 6, ...)`` of ``(B, 1, ...)`` images: for each of the six
    face neighbours at ``distance`` voxels, ``exp(-D / V)`` with ``D`` the patch-averaged
    squared difference to that neighbour and ``V`` its mean over the six (a local
    variance), scaled so the largest is 1. Contrast changes that keep edges, even an
    inversion, leave them unchanged.

    The squared difference to the neighbour behind is the one to the neighbour ahead seen
    from that neighbour, so three patch means are computed and the other three are those
    shifted back (edge values replicated: within ``distance + patch // 2`` voxels of a
    grid's lower faces the descriptors see the edge repeated).

    >>> x = torch.rand(1, 1, 10, 10, 10)
    >>> bool(torch.allclose(mind(x), mind(1 - x), atol=1e-5))
    True
    """
    ahead = torch.cat([(x - _shift(x, axis, distance)) ** 2 for axis in range(3)], 1)
    ahead = _local_mean(ahead, patch)
    dists = []
    for axis in range(3):
        d = ahead[:, axis:axis + 1]
        dists += [d, _shift(d, axis, -distance)]
    d = torch.cat(dists, 1)
    # exp(-d / v) / max over the six = exp(-(d - min d) / v): the largest is exactly 1
    rate = d.mean(1, keepdim=True).clamp_min(eps).reciprocal().neg()
    return torch.exp((d - d.amin(1, keepdim=True)) * rate)


def mind_loss(moved: torch.Tensor, fixed: torch.Tensor, distance: int = 2,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference of MIND descriptors: for pairs of different contrasts."""
    return _mean((mind(moved, distance) - mind(fixed, distance)).abs(), weight)


#: histogram bins of :func:`mutual_information` (Mattes' metric in ANTs and elastix uses 32)
MI_BINS = 32


def _parzen(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft histogram memberships of the values ``x`` ``(N,)`` in ``bins`` bins spread
    evenly over the range of ``x`` (detached: the range is not optimised), with a
    triangular window one bin wide on each side (linear B-spline): each value's lower bin
    ``(N,)`` (int64) and its share ``(N,)`` of the next bin (the rest goes to the lower)."""
    lo, hi = x.detach().amin(), x.detach().amax()
    u = ((x - lo) / (hi - lo).clamp_min(1e-8) * (bins - 1)).clamp(0, bins - 1)
    low = u.detach().floor().clamp(max=bins - 2)
    return low.long(), u - low


def _joint(fixed_bins: tuple[torch.Tensor, torch.Tensor],
           moved_bins: tuple[torch.Tensor, torch.Tensor], bins: int,
           weight: torch.Tensor | None) -> torch.Tensor:
    """Joint histogram ``(bins, bins)`` (a probability) of two sets of memberships."""
    (i, a), (j, b) = fixed_bins, moved_bins
    if weight is not None:
        w = weight.reshape(-1).to(a.dtype)
        wa = (w * (1 - a), w * a)
    else:
        wa = (1 - a, a)
    joint = torch.zeros(bins * bins, dtype=b.dtype, device=b.device)
    for di, fa in enumerate(wa):
        for dj, fb in enumerate((1 - b, b)):
            joint = joint.index_add(0, (i + di) * bins + (j + dj), fa * fb)
    return (joint / joint.sum().clamp_min(1e-12)).view(bins, bins)


def mutual_information(moved: torch.Tensor, fixed: torch.Tensor, bins: int = MI_BINS,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative mutual information (nats) of the two images' intensities, one joint
    histogram over all voxels (weighted by ``weight``), with linear Parzen windows of
    ``bins`` bins over each image's own range: a global statistic, as the Mattes metric
    of ANTs and elastix, for any contrast whose tissues keep distinct intensities. A batch
    gets the mean over its pairs.

    >>> x = torch.rand(1, 1, 20, 20, 20)
    >>> same, inverted = mutual_information(x, x), mutual_information(1 - x, x)
    >>> bool(torch.isclose(same, inverted, atol=1e-4)), float(same) < -2.0
    (True, True)
    >>> float(mutual_information(torch.rand(1, 1, 20, 20, 20), x)) > -0.1
    True
    """
    if moved.shape[0] > 1:  # one histogram per pair of the batch
        return torch.stack([mutual_information(
            moved[b:b + 1], fixed[b:b + 1], bins,
            None if weight is None else weight[b:b + 1]) for b in range(moved.shape[0])]
        ).mean()
    return -_mi(_parzen(fixed.flatten(), bins), moved, weight, bins)


def _mi(fixed_bins: tuple[torch.Tensor, torch.Tensor], moved: torch.Tensor,
        weight: torch.Tensor | None, bins: int = MI_BINS) -> torch.Tensor:
    """Mutual information of ``moved``'s intensities and the memberships ``fixed_bins``
    (:func:`_parzen` of the fixed image, voxel by voxel)."""
    if weight is not None:
        weight = weight.expand_as(moved)
    joint = _joint(fixed_bins, _parzen(moved.flatten(), bins), bins, weight)
    p_f, p_m = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    tiny = 1e-10
    return (joint * (torch.log(joint + tiny) - torch.log(p_f @ p_m + tiny))).sum()


#: weight of the mutual information next to MIND in :func:`mind_mi`: on the template pairs
#: of ``benchmarks/accuracy.py`` (session 18) 0.1 gave the best Dice of 0.1 / 0.3 / 1
MIND_MI_WEIGHT = 0.1


def mind_mi(moved: torch.Tensor, fixed: torch.Tensor,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """MIND's loss plus :data:`MIND_MI_WEIGHT` times the negative mutual information: the
    local edges of MIND and the global intensity pairing of MI (with MIND alone, a T2-like
    image registered to a T1 template kept a CSF Dice of 0.57, ANTs SyN's MI 0.79).

    >>> x = torch.rand(1, 1, 20, 20, 20)
    >>> bool(mind_mi(1 - x, x) < mind_mi(torch.rand(1, 1, 20, 20, 20), x))
    True
    """
    return (mind_loss(moved, fixed, weight=weight)
            + MIND_MI_WEIGHT * mutual_information(moved, fixed, weight=weight))


#: image similarities by name (``--similarity`` of image-based training and refinement)
IMAGE_SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ncc": local_ncc,
    "mse": image_mse,
    "mind": mind_loss,
    "mi": mutual_information,
    "mind+mi": mind_mi,
}


def features(name: str, x: torch.Tensor) -> torch.Tensor | None:
    """What similarity ``name`` compares of ``(B, 1, ...)`` images when it can be computed
    once and warped with a field instead of recomputed from each warped image: MIND's
    descriptors ``(B, 6, ...)``; None for the similarities that need the warped intensities
    themselves (local statistics of NCC, MSE).

    >>> features("mind", torch.rand(1, 1, 6, 6, 6)).shape, features("ncc", torch.rand(1, 1))
    (torch.Size([1, 6, 6, 6, 6]), None)
    """
    return mind(x) if name == "mind" else None


def feature_loss(moved: torch.Tensor, fixed: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference of :func:`features` (warped ones against fixed ones),
    weighted as the similarities are; MIND's loss when both are MIND descriptors.

    >>> x, y = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    >>> bool(torch.isclose(feature_loss(mind(x), mind(y)), mind_loss(x, y)))
    True
    """
    return _mean((moved - fixed).abs(), weight)


def fixed_similarity(name: str, fixed: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The loss ``IMAGE_SIMILARITIES[name](moved, fixed, weight=weight)`` as a function of
    ``moved`` (and an optional ``weight``) alone, with what depends on ``fixed`` only (its
    MIND descriptors) computed once.

    >>> x, y = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    >>> bool(torch.isclose(fixed_similarity("mind", y)(x), mind_loss(x, y)))
    True
    """
    if name == "mind":
        desc = mind(fixed)
        return lambda moved, weight=None: _mean((mind(moved) - desc).abs(), weight)
    if name == "mind+mi":
        to_mind, to_mi = fixed_similarity("mind", fixed), fixed_similarity("mi", fixed)
        return lambda moved, weight=None: (to_mind(moved, weight)
                                           + MIND_MI_WEIGHT * to_mi(moved, weight))
    if name == "mi":  # the fixed image's histogram memberships, once
        bins = _parzen(fixed.flatten(), MI_BINS)
        return lambda moved, weight=None: -_mi(bins, moved, weight)
    sim = IMAGE_SIMILARITIES[name]
    return lambda moved, weight=None: sim(moved, fixed, weight=weight)
