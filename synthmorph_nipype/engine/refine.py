"""Test-time refinement: optimise the network's velocity field on the pair itself.

The deformable network predicts a stationary velocity field (SVF) in one pass; refinement
then takes it as the starting point of ``iterations`` Adam steps on the same objective
form the network was trained with, ``(1 - lambda) * similarity + lambda * Grad-l2``, but
with an image similarity (no labels at test time), symmetrically: image 1 pulled onto
image 2 and image 2 onto image 1 through the inverse (the negated SVF).

Masks (``mask_1``, ``mask_2``: weights in [0, 1] on the images' grids, as ANTs' ``-x``)
restrict the similarity to the voxels they cover: each direction counts the voxels inside
the mask of the grid it is computed on and inside the other image's mask carried along
with the moved image (as weights only: no gradient flows through them), so a head outline
outside a brain mask pulls nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..ops.grid import REVERSED, normalised_matrix, voxel_grid
from ..ops.integrate import integrate_svf, pool_field, upsample_field
from ..ops.linalg import rotation_exp
from ..ops.optim import Adam
from ..ops.regularity import grad_l2, weighted_grad_l2
from ..ops.sampling import grid_sample, sample_linear
from ..ops.similarity import IMAGE_SIMILARITIES, feature_loss, features, fixed_similarity, image_mse


def _weights(mask_here: torch.Tensor | None, moved_mask: torch.Tensor | None
             ) -> torch.Tensor | None:
    """The similarity weight on one grid: its own mask times the other image's moved mask
    (None without masks)."""
    if mask_here is None and moved_mask is None:
        return None
    if mask_here is None:
        return moved_mask
    return mask_here if moved_mask is None else mask_here * moved_mask


def pooled(x: torch.Tensor | None, pool: int) -> torch.Tensor | None:
    """A volume ``(X, Y, Z)`` average-pooled ``pool`` times (None stays None)."""
    if x is None or pool == 1:
        return x
    return F.avg_pool3d(x[None, None].float(), pool)[0, 0]


#: Adam's epsilon in the SVF refinement, as a share of the first gradient's RMS: with
#: torch's 1e-8 (1/30 of that RMS on the demo pair) every voxel moves by about the full
#: rate each early step, gradient or not (Adam's steps go by the sign), and the loss first
#: rose by half and took 10 of 20 steps to come back; a floor at the typical gradient
#: leaves voxels with little of it nearly still
ADAM_FLOOR = 1.0
FOREGROUND = 0.01  # image values (min-max scaled) above this are content, for the crop


def _support(images, masks) -> torch.Tensor:
    """Where the similarity can act, voxel by voxel: inside the masks when any is given,
    else where either image exceeds :data:`FOREGROUND` (the voxels :func:`content_box`
    boxes)."""
    given = [m for m in masks if m is not None]
    if given:
        return torch.stack(given).amax(0) > 0
    return torch.stack(list(images)).amax(0) > FOREGROUND


def _rms(grad: torch.Tensor, support: torch.Tensor) -> float:
    """RMS of a channels-last gradient over the ``support`` voxels (all, if none): the
    same voxels whether the grid is the whole one or a box around them."""
    inside = grad[support] if bool(support.any()) else grad
    return float(inside.pow(2).mean().sqrt())


def content_box(images, masks, margin: int) -> tuple[slice, slice, slice] | None:
    """The box of voxels where the similarity can act, grown by ``margin`` voxels
    (clipped to the grid): inside the masks when any is given (the similarity counts
    nothing else), else where either image exceeds :data:`FOREGROUND`. None when that
    is the whole grid or nothing."""
    where = _support(images, masks)
    box = []
    for axis in range(3):
        hit = where.any(dim=tuple(a for a in range(3) if a != axis)).nonzero()
        if not len(hit):
            return None
        n = where.shape[axis]
        box.append(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)))
    if all(b.stop - b.start == n for b, n in zip(box, where.shape, strict=True)):
        return None
    return tuple(box)


def _taper(box: tuple[slice, ...], shape, margin: int, like: torch.Tensor) -> torch.Tensor:
    """A window ``(x, y, z, 1)`` over ``box``: 1 inside, falling linearly to 0 across the
    ``margin`` voxels of each face that lies inside the grid (a face on the grid's edge
    keeps 1), so a correction computed in the box joins the field outside continuously."""
    window = torch.ones((), dtype=like.dtype, device=like.device)
    for axis, (b, n) in enumerate(zip(box, shape, strict=True)):
        i = torch.arange(b.stop - b.start, dtype=like.dtype, device=like.device)
        ramp = torch.ones_like(i)
        if b.start > 0:
            ramp = ramp.minimum((i + 1) / (margin + 1))
        if b.stop < n:
            ramp = ramp.minimum((b.stop - b.start - i) / (margin + 1))
        view = [1, 1, 1, 1]
        view[axis] = -1
        window = window * ramp.view(view)
    return window


def refine_svf(svf: torch.Tensor, image_1: torch.Tensor, image_2: torch.Tensor, *,
               iterations: int, lam: float = 0.5, similarity: str = "ncc", steps: int = 7,
               lr: float = 0.05, pool: int = 1, weight: torch.Tensor | None = None,
               mask_1: torch.Tensor | None = None, mask_2: torch.Tensor | None = None,
               warp_features: bool = False, exact_gradient: bool = True,
               crop_margin: int | None = None
               ) -> tuple[torch.Tensor, list[float]]:
    """Refine a channels-last SVF ``(X, Y, Z, 3)`` (voxels) between two images ``(X, Y, Z)``
    on the same grid; returns the refined SVF and the loss before each step.

    The objective is ``(1 - lam) * dissimilarity + lam * smoothness``; the smoothness is
    Grad-l2, or with ``weight`` (a voxel-wise map ``(X, Y, Z)`` on the same grid, e.g. a
    spatially varying model's lambda map) the mean of ``weight * |grad u|^2`` scaled to
    equal Grad-l2 where the weight is 1.

    ``integrate(svf)`` maps a point of image 2's grid to where image 1 is sampled (the
    engine's pull-back convention), ``integrate(-svf)`` the reverse. With ``pool`` > 1 the
    optimisation runs on a grid that many times coarser (images average-pooled, a step
    costs ``pool**3`` times less) and adds its correction, upsampled, to the fine SVF.
    ``mask_1``, ``mask_2`` (``(X, Y, Z)``, optional) restrict the similarity (module
    docstring). ``warp_features`` (MIND): the descriptors of both images are computed once
    and warped with the field, instead of recomputed from each warped image.
    ``exact_gradient=False`` differentiates the loss in the integrated displacements and
    takes that as the SVF's gradient (``d exp(v) / dv`` ~ identity, as log-domain demons'
    updates): no backward pass through the scaling and squaring. With ``crop_margin``
    the optimisation runs on the :func:`content_box` of the pair grown by that many
    voxels (of the optimised grid) only, and its correction is tapered to zero across
    the margin (background: the field outside the box stays the network's).
    """
    if similarity not in IMAGE_SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}, choose from "
                         f"{', '.join(IMAGE_SIMILARITIES)}")
    settings = dict(iterations=iterations, lam=lam, similarity=similarity, steps=steps,
                    lr=lr, warp_features=warp_features, exact_gradient=exact_gradient)
    if pool == 1:
        return _refine_box(svf, image_1, image_2, weight, mask_1, mask_2, crop_margin,
                           settings)
    start = pool_field(svf, pool)
    refined, history = _refine_box(start, pooled(image_1, pool), pooled(image_2, pool),
                                   pooled(weight, pool), pooled(mask_1, pool),
                                   pooled(mask_2, pool), crop_margin, settings)
    return svf + upsample_field(refined - start, svf.shape[:3], pool), history


def _refine_box(svf, image_1, image_2, weight, mask_1, mask_2, crop_margin, settings):
    """:func:`refine_svf` on one grid: on the whole of it, or with ``crop_margin`` on the
    :func:`content_box` only, the correction tapered into the field around it."""
    box = None if crop_margin is None else content_box((image_1, image_2),
                                                       (mask_1, mask_2), crop_margin)
    if box is None:
        return _optimise_svf(svf, image_1, image_2, weight=weight, mask_1=mask_1,
                             mask_2=mask_2, **settings)

    def cut(x):
        return None if x is None else x[box].contiguous()

    start = svf[box].contiguous()
    # the same objective: a masked similarity is a mean over the masks, which the box
    # holds, the smoothness a mean over the grid (without masks both are means over the
    # grid, so both shrink alike, and Adam's steps do not change)
    share = start[..., 0].numel() / svf[..., 0].numel() if (
        mask_1 is not None or mask_2 is not None) else 1.0
    refined, history = _optimise_svf(start, cut(image_1), cut(image_2), weight=cut(weight),
                                     mask_1=cut(mask_1), mask_2=cut(mask_2),
                                     smooth_share=share, **settings)
    out = svf.clone()
    out[box] += (refined - start) * _taper(box, svf.shape[:3], crop_margin, svf)
    return out, history


def _optimise_svf(svf, image_1, image_2, *, iterations, lam, similarity, steps, lr,
                  weight, mask_1, mask_2, warp_features, exact_gradient,
                  smooth_share: float = 1.0):
    """The Adam steps of :func:`refine_svf` on one grid (no pooling, no box); the
    smoothness term weighted by ``smooth_share`` (a box's share of its whole grid)."""
    grid = voxel_grid(image_1.shape, dtype=svf.dtype, device=svf.device)
    compare = _symmetric_similarity(similarity, image_1, image_2, warp_features)
    w = None if weight is None else weight[None, None].to(svf)
    velocity = svf.detach().clone().requires_grad_(True)
    opt = Adam([velocity], lr=lr)
    support = _support((image_1, image_2), (mask_1, mask_2))
    history = []
    with torch.enable_grad():
        for _ in range(iterations):
            if exact_gradient:
                d1, d2 = integrate_svf(velocity, steps), integrate_svf(-velocity, steps)
            else:  # the loss is differentiated in the displacements, taken as the SVF's
                with torch.no_grad():
                    d1, d2 = integrate_svf(velocity, steps), integrate_svf(-velocity, steps)
                d1.requires_grad_(True)
                d2.requires_grad_(True)
            w_2 = _weights(_batch(mask_2), _moved(mask_1, grid + d1))  # on image 2's grid
            w_1 = _weights(_batch(mask_1), _moved(mask_2, grid + d2))
            similarity_term = compare(grid + d1, grid + d2, w_2, w_1)
            u1, u2 = d1.permute(3, 0, 1, 2)[None], d2.permute(3, 0, 1, 2)[None]
            if weight is None:
                smooth = 0.5 * (grad_l2(u1) + grad_l2(u2))
            else:  # grad_sq sums the 3 components, grad_l2 averages them
                smooth = (weighted_grad_l2(u1, w) + weighted_grad_l2(u2, w)) / 6
            loss = (1 - lam) * similarity_term + lam * smooth_share * smooth
            history.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            if not exact_gradient:  # d exp(v) / dv ~ identity, d exp(-v) / dv ~ -identity
                velocity.grad = d1.grad - d2.grad
            if len(history) == 1:  # the first step sets Adam's floor from the gradient's size
                opt.eps = ADAM_FLOOR * _rms(velocity.grad, support)
            opt.step()
    return velocity.detach(), history


def _symmetric_similarity(name: str, image_1: torch.Tensor, image_2: torch.Tensor,
                          warp_features: bool):
    """``compare(points_1, points_2, w_2, w_1)``: the mean of the similarity of image 1
    sampled at ``points_1`` (on image 2's grid) to image 2 and of image 2 at ``points_2``
    to image 1. What depends on the still images alone is computed once: with
    ``warp_features`` and a similarity that has
    :func:`~synthmorph_nipype.ops.similarity.features` (MIND), the descriptors of both
    images, which are then sampled instead of the images (no descriptor is recomputed
    per step, as in ConvexAdam); otherwise the fixed side's."""
    x1, x2 = image_1[None, None].float(), image_2[None, None].float()
    f1 = features(name, x1) if warp_features else None
    if f1 is not None:
        f2 = features(name, x2)
        last_1, last_2 = f1[0].permute(1, 2, 3, 0), f2[0].permute(1, 2, 3, 0)

        def compare(points_1, points_2, w_2, w_1):
            moved_1 = sample_linear(last_1, points_1).permute(3, 0, 1, 2)[None]
            moved_2 = sample_linear(last_2, points_2).permute(3, 0, 1, 2)[None]
            return 0.5 * (feature_loss(moved_1, f2, w_2) + feature_loss(moved_2, f1, w_1))
        return compare
    to_2, to_1 = fixed_similarity(name, x2), fixed_similarity(name, x1)

    def compare(points_1, points_2, w_2, w_1):
        moved_1 = sample_linear(image_1, points_1)[None, None]
        moved_2 = sample_linear(image_2, points_2)[None, None]
        return 0.5 * (to_2(moved_1, w_2) + to_1(moved_2, w_1))
    return compare


def _batch(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask[None, None].float()


def _moved(mask: torch.Tensor | None, points: torch.Tensor) -> torch.Tensor | None:
    """``mask`` sampled at ``points`` (zero outside), batched; None without a mask.
    Detached: the weights say where to compare, the optimiser cannot move them to where
    comparing is easy."""
    if mask is None:
        return None
    return sample_linear(mask.float(), points.detach())[None, None]


class _Box:
    """Where the affine refinement works on one pooled grid of ``shape``: the voxels its
    points are drawn from (``inner``: the grid's content box) and the larger box its
    feature volumes cover (``slices``: ``inner`` grown by ``halo``, clipped), with the
    maps from the box's indices and normalised coordinates to the grid's normalised
    coordinates."""

    def __init__(self, inner: tuple[slice, ...], shape, halo: int):
        self.slices = tuple(slice(max(0, b.start - halo), min(int(n), b.stop + halo))
                            for b, n in zip(inner, shape, strict=True))
        self.inner = tuple(slice(b.start - f.start, b.stop - f.start)
                           for b, f in zip(inner, self.slices, strict=True))
        self.shape = [f.stop - f.start for f in self.slices]
        start = np.eye(4)
        start[:3, 3] = [f.start for f in self.slices]  # box index -> grid index
        index = normalised_matrix(shape) @ start
        from_box = index @ np.linalg.inv(normalised_matrix(self.shape))
        self.index = torch.as_tensor(index[:3], dtype=torch.float32)
        self.from_box = torch.as_tensor(from_box, dtype=torch.float32)
        self.to_box = torch.as_tensor(np.linalg.inv(from_box), dtype=torch.float32)

    def crop(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """``x`` (1, C, X, Y, Z) cut to the box."""
        return None if x is None else x[(..., *self.slices)].contiguous()

    def local(self, points: torch.Tensor) -> torch.Tensor:
        """Grid-normalised ``points`` (K, 3) in the box's normalised coordinates."""
        t = self.to_box.to(points)
        return points @ t[:3, :3].T + t[:3, 3]


def _boxes(image: torch.Tensor, mask: torch.Tensor | None, margin: int) -> _Box:
    """The :class:`_Box` of one pooled image (1, 1, X, Y, Z): its mask's box, or its
    content's (above :data:`FOREGROUND`), grown by ``margin`` voxels (the whole grid when
    that covers it or finds nothing)."""
    shape = image.shape[2:]
    inner = content_box([image[0, 0]], [None if mask is None else mask[0, 0]], margin)
    return _Box(inner or tuple(slice(0, int(n)) for n in shape), shape, HALO)


def _pool_matrix(pool: int) -> np.ndarray:
    """Pooled index ``k`` -> full-resolution index ``pool * k + (pool - 1) / 2``."""
    m = np.diag([float(pool)] * 3 + [1.0])
    m[:3, 3] = (pool - 1) / 2
    return m


def _pull(image: torch.Tensor, matrix: torch.Tensor, box: _Box | None = None
          ) -> torch.Tensor:
    """``image`` (1, 1, X, Y, Z) sampled at ``matrix`` (4x4, normalised (i, j, k)) of each
    voxel of its own grid, or of ``box`` of it (:class:`_Box`); zero outside."""
    shape = list(image.shape)
    if box is not None:
        matrix = matrix @ box.from_box.to(matrix)
        shape[2:] = box.shape
    theta = matrix[:3][REVERSED][:, REVERSED + [3]]
    grid = F.affine_grid(theta[None], shape, align_corners=True)
    return grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                       align_corners=True)


def _increment(params: torch.Tensor, shift: torch.Tensor, rigid: bool) -> torch.Tensor:
    """4x4 matrix of the refinement's parameters: a rotation (axis-angle) or identity plus
    a free 3x3 part, and a translation."""
    eye = torch.eye(4, dtype=params.dtype, device=params.device)
    lin = rotation_exp(params) if rigid else eye[:3, :3] + params.view(3, 3)
    return torch.cat([torch.cat([lin, shift[:, None]], 1), eye[3:]], 0)


#: points the affine refinement compares per step and direction, drawn anew each step
#: (8,192 gave the held-out motion pairs the same error as 32,768: 0.209 mm mean)
POINTS = 1 << 13
#: steps between computations of the moved images' features on the first (coarsest)
#: level of ``refine_matrix`` (20 instead of 10, with 60 + 30 steps instead of 60 + 60,
#: moved the held-out motion pairs' mean error from 0.21 to 0.26 mm at 0.4 of the cost);
#: the finer levels, which start close and cost most, compute them once (0.22 mm, and 0.85
#: of the time)
ANCHOR = 20
#: full-resolution voxels around each image's content (or mask) where the affine
#: refinement still draws points: the background next to an outline carries its edge
POINT_MARGIN = 16
#: pooled voxels the feature volumes reach beyond the points' box: MIND's footprint
#: (distance 2 ahead and behind, patch 3) plus the moves of the points between anchors
#: (on a level after the first, the whole level)
HALO = 7


def _sample_at(vol: torch.Tensor, points: torch.Tensor, padding: str = "border"
               ) -> torch.Tensor:
    """``vol`` (1, C, X, Y, Z) at ``points`` (K, 3; normalised (i, j, k)) as (1, C, K, 1, 1);
    outside the grid the edge values (features: those of the background around an
    image) or, with ``padding="zeros"``, zero (masks)."""
    grid = points[:, REVERSED].reshape(1, -1, 1, 1, 3)
    return grid_sample(vol, grid, mode="bilinear", padding_mode=padding,
                       align_corners=True)


#: what the affine refinement compares voxel by voxel, and how (NCC needs windows of the
#: moved image: no single points)
POINT_SIMILARITIES = {"mind": feature_loss, "mse": image_mse}


def _point_features(name: str, x: torch.Tensor) -> torch.Tensor:
    """MIND descriptors of ``x`` (``name="mind"``), or the intensities themselves (MSE)."""
    return features(name, x) if name == "mind" else x


def refine_matrix(matrix: np.ndarray, image_1: torch.Tensor, image_2: torch.Tensor, *,
                  iterations: int | tuple[int, ...], similarity: str = "mind",
                  rigid: bool = False,
                  pools: tuple[int, ...] = (4, 2), lr: float = 0.01,
                  mask_1: torch.Tensor | None = None, mask_2: torch.Tensor | None = None,
                  points: int = POINTS, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Refine an affine ``matrix`` (image 2's voxel index -> image 1's voxel index, both
    images ``(X, Y, Z)`` on one grid) by Adam steps on a symmetric image similarity (image
    1 pulled onto image 2 through the matrix plus image 2 onto image 1 through its
    inverse), level by level of ``pools`` (average-pooling factors, coarse to fine):
    ``iterations`` steps on each (or one count per level), finer levels at a smaller
    rate, which on each level stays for two thirds of its steps, then falls to zero
    along a half cosine.

    Each step compares ``points`` random voxels per direction, drawn inside each grid's
    mask (as elastix's and ANTs' sampled metrics; ``seed`` makes the draws repeatable),
    or without one within :data:`POINT_MARGIN` voxels of the image's content, so a step
    costs the same on every level; the feature volumes cover that box only (plus
    :data:`HALO`). What is compared - MIND descriptors
    (``similarity="mind"``) or intensities (``"mse"``) - is computed from each image
    moved by the matrix as it stands, on the first level every :data:`ANCHOR` steps,
    on finer ones once: in between, the steps' small change of the matrix moves the
    computed features (MIND's neighbour directions stay those of the grid they were
    computed on).
    ``rigid`` keeps rotations and translations only (on top of the starting matrix);
    ``mask_1``, ``mask_2`` (``(X, Y, Z)``, optional) restrict the similarity (module
    docstring). Returns the refined matrix and the loss before each step.
    """
    if similarity not in POINT_SIMILARITIES:
        raise ValueError(f"the affine refinement compares points: similarity mind or mse, "
                         f"not {similarity!r}")
    dev, dtype = image_1.device, torch.float32
    compare = POINT_SIMILARITIES[similarity]
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    current = np.asarray(matrix, float)
    counts = (iterations,) * len(pools) if isinstance(iterations, int) else tuple(iterations)
    if len(counts) != len(pools):
        raise ValueError(f"{len(counts)} iteration counts for {len(pools)} levels")
    for level, (pool, count) in enumerate(zip(pools, counts, strict=True)):
        x1 = F.avg_pool3d(image_1[None, None].float(), pool)
        x2 = F.avg_pool3d(image_2[None, None].float(), pool)
        k1, k2 = (None if m is None else F.avg_pool3d(m[None, None].float(), pool)
                  for m in (mask_1, mask_2))
        # each grid's points, features and masks live in the box of its content only
        margin = -(-POINT_MARGIN // pool)
        b1, b2 = _boxes(x1, k1, margin), _boxes(x2, k2, margin)
        f1 = _point_features(similarity, b1.crop(x1))
        f2 = _point_features(similarity, b2.crop(x2))
        c1, c2 = b1.crop(k1), b2.crop(k2)
        p, c = _pool_matrix(pool), normalised_matrix(x1.shape[2:])
        # the points a step compares: voxels of each box's inner part, inside the mask
        pool_1, pool_2 = (_candidates(k, b, dev) for k, b in ((c1, b1), (c2, b2)))
        # the matrix in normalised pooled coordinates; refinement composes an increment
        # after it (on image 2's side): M' = M D
        to_c = torch.as_tensor(c @ np.linalg.inv(p), dtype=torch.float64)
        base = to_c @ torch.as_tensor(current) @ torch.linalg.inv(to_c)
        base = base.to(dtype=dtype, device=dev)
        params = torch.zeros(3 if rigid else 9, dtype=dtype, device=dev, requires_grad=True)
        shift = torch.zeros(3, dtype=dtype, device=dev, requires_grad=True)
        rate = lr * pool / pools[0]  # finer levels take smaller steps
        opt = Adam([params, shift], lr=rate)
        with torch.enable_grad():
            for step in range(count):
                # constant for two thirds of the level (the matrix travels), then falling
                # to 0 along a half cosine (it settles): at a constant rate the matrix of
                # an inter-subject pair ended ~3 mm apart when only the rounding changed
                # (1 or 2 threads), with the decay 1.4 mm, and the Dice of both rose
                late = max(0.0, 3 * step / count - 2)  # the last third of the level
                opt.lr = rate * 0.5 * (1 + math.cos(math.pi * late))
                if step % (ANCHOR if level == 0 else count) == 0:
                    with torch.no_grad():  # features of the images moved as the matrix stands
                        base = base @ _increment(params, shift, rigid)
                        params.zero_()
                        shift.zero_()
                        back = torch.linalg.inv(base)
                        # image 1 moved onto image 2's box, image 2 onto image 1's
                        g1 = _point_features(similarity, _pull(x1, base, b2))
                        g2 = _point_features(similarity, _pull(x2, back, b1))
                        h1 = None if k1 is None else _pull(k1, base, b2)
                        h2 = None if k2 is None else _pull(k2, back, b1)
                d = _increment(params, shift, rigid)
                # image 2 onto image 1 through D^-1 B^-1 = B^-1 (B D^-1 B^-1)
                e = base @ torch.linalg.inv(d) @ back
                v2, p2 = _draw(pool_2, points, gen, b2)  # voxels of image 2's grid
                v1, p1 = _draw(pool_1, points, gen, b1)
                at_1, at_2 = p2 @ d[:3, :3].T + d[:3, 3], p1 @ e[:3, :3].T + e[:3, 3]
                w_2 = _point_weights(c2, h1, v2, at_1, base, b2)
                w_1 = _point_weights(c1, h2, v1, at_2, back, b1)
                loss = 0.5 * (compare(_sample_at(g1, b2.local(at_1)), _gather(f2, v2), w_2)
                              + compare(_sample_at(g2, b1.local(at_2)), _gather(f1, v1), w_1))
                history.append(float(loss.detach()))
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            m = (base @ _increment(params, shift, rigid)).double().cpu()
        current = (torch.linalg.inv(to_c) @ m @ to_c).numpy()
    return current, history


def _candidates(mask: torch.Tensor | None, box: _Box, device) -> torch.Tensor:
    """Flat indices (of ``box``'s volume) of the voxels a step may compare: those of its
    inner part, inside ``mask`` (1, 1, ...: cropped to the box) where given."""
    where = torch.zeros(box.shape, dtype=torch.bool, device=device)
    where[box.inner] = True
    if mask is not None:
        where &= mask[0, 0] > 0
    return torch.nonzero(where.flatten())[:, 0]


def _draw(candidates: torch.Tensor, count: int, gen: torch.Generator, box: _Box
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` voxels drawn from ``candidates`` (flat indices of ``box``'s volume; with
    replacement, in memory order, which keeps the sampling cache-friendly) and their
    normalised coordinates on the whole grid."""
    pick = torch.randint(len(candidates), (count,), generator=gen).to(candidates.device)
    flat = candidates[pick].sort().values
    _, ny, nz = box.shape
    ijk = torch.stack([flat // (ny * nz), flat // nz % ny, flat % nz], 1)
    m = box.index.to(ijk.device)
    return flat, ijk.to(m.dtype) @ m[:, :3].T + m[:, 3]


def _gather(vol: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``vol`` (1, C, X, Y, Z) at flat voxel indices (K,), as (1, C, K, 1, 1)."""
    return vol.flatten(2)[:, :, flat][..., None, None]


def _point_weights(mask_here: torch.Tensor | None, moved_mask: torch.Tensor | None,
                   here: torch.Tensor, there: torch.Tensor, to_other: torch.Tensor,
                   box: _Box) -> torch.Tensor:
    """The weights of the compared points (detached): this grid's mask at voxels
    ``here`` (flat indices of ``box``, the mask cropped to it) times the other image's
    moved mask (computed on ``box``) at points ``there`` (:func:`_weights`), and zero
    where ``to_other @ there`` falls outside the other image's grid (as ANTs and
    elastix, points without a partner do not count)."""
    there = there.detach()
    inside = ((there @ to_other[:3, :3].T + to_other[:3, 3]).abs() <= 1).all(-1)
    weight = inside.to(there.dtype).reshape(1, 1, -1, 1, 1)
    masks = _weights(None if mask_here is None else _gather(mask_here, here),
                     None if moved_mask is None
                     else _sample_at(moved_mask, box.local(there), "zeros"))
    return weight if masks is None else weight * masks
