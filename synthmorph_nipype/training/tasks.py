"""What is trained: a network, its forward pass on a synthetic pair, and its objective.

A task owns one network and knows how to turn a synthetic pair into a loss and into
validation figures. The trainer only sees this interface, so a new model or objective is
a new :class:`Task` (registered in :data:`TASKS`) or a new entry of
:data:`SIMILARITIES` / :data:`REGULARIZERS`.

Tasks work on the training grid (the half-resolution network space, batch 1) with
pull-back maps in voxel indices, the conventions of :mod:`synthmorph_nipype.engine.network`:
the fixed image is ``image_2``, and the moving ``image_1`` is sampled at the mapped points.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..models.affine import AffineConfig, AffineDetector
from ..models.joint import HyperUNet, UNet, UNetConfig, split_lambda
from ..models.layers import HyperConv3d
from ..ops.cascade import cascade
from ..ops.grid import apply_affine, centred_to_index, voxel_grid
from ..ops.integrate import integrate_svf
from ..ops.jacobian import folding_percent
from ..ops.regularity import beta_prior, grad_l2, weighted_grad_l2
from ..ops.sampling import sample_linear
from ..ops.similarity import IMAGE_SIMILARITIES
from .distill import Distillation, teacher_svf
from .losses import label_mse, soft_dice


@dataclass
class Pair:
    """A training pair on the training grid: images ``(1, 1, *s)`` in [0, 1] and one-hot
    loss labels ``(1, L, *s)``."""

    image_1: torch.Tensor
    image_2: torch.Tensor
    onehot_1: torch.Tensor
    onehot_2: torch.Tensor
    truth: torch.Tensor | None = None  # (4, 4) true fixed -> moving voxel map, when known
    labels_1: torch.Tensor | None = None  # (1, *s) the full label maps (incl. ignored ones)
    labels_2: torch.Tensor | None = None
    # (*s, 3) true fixed -> moving displacement (voxels), when known (one anatomy)
    disp_truth: torch.Tensor | None = None
    source: str = ""  # what the label maps came from ("shapes", "subject", ...)


def _dissimilarity_dice(moved: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    return 1 - soft_dice(moved, fixed)


SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "label_mse": label_mse,
    "dice": _dissimilarity_dice,
}
REGULARIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"grad_l2": grad_l2}


def warp_onehot(onehot: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Sample one-hot maps ``(1, L, *s)`` at voxel points ``(*t, 3)`` -> ``(1, L, *t)``
    (linear, zero outside), differentiable in the points."""
    vol = onehot[0].permute(1, 2, 3, 0)
    return sample_linear(vol, points).permute(3, 0, 1, 2)[None]


def _mapped(matrix: torch.Tensor, shape, stride: int = 1) -> torch.Tensor:
    """``matrix @ x`` for the voxels ``x`` of ``shape`` taken every ``stride``."""
    grid = voxel_grid(shape, dtype=matrix.dtype, device=matrix.device)
    return apply_affine(matrix, grid[::stride, ::stride, ::stride])


def init_weights(model: nn.Module, slope: float = 0.2) -> None:
    """He initialisation for LeakyReLU networks (PyTorch's default shrinks activations layer
    by layer, which starves the detector's barycentres and the U-Net of signal). A hyper
    convolution gets He-scaled kernels from its bias and small hyper weights, so every
    ``lambda`` starts from about the same network."""
    gain = (2.0 / (1 + slope**2)) ** 0.5
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.normal_(m.weight, std=gain / (m.weight[0].numel()) ** 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, HyperConv3d):
            std = gain / (27 * m.cin) ** 0.5
            nn.init.normal_(m.hyperkernel.bias, std=std)
            nn.init.normal_(m.hyperkernel.weight, std=0.1 * std)
            nn.init.zeros_(m.hyperbias.bias)
            nn.init.normal_(m.hyperbias.weight, std=1e-3)


@torch.no_grad()
def load_start(model: nn.Module, start: HyperUNet, lam: float = 0.5) -> None:
    """Start ``model`` from a trained hyper U-Net: the same weights for a hyper U-Net; for a
    U-Net with a lambda head, the convolutions ``start`` predicts for ``lam`` (its velocity
    channels), the head keeping its fresh initialisation."""
    if isinstance(model, HyperUNet):
        model.load_state_dict(start.state_dict())
        return
    plain = start.specialize(lam).to(next(model.parameters()).device)
    for mine, theirs in zip(model.convs, plain.convs, strict=True):
        n = theirs.weight.shape[0]
        mine.weight[:n].copy_(theirs.weight)
        mine.bias[:n].copy_(theirs.bias)


class Task:
    """Interface of a trainable task (see the module docstring)."""

    name = "task"
    model: nn.Module

    def loss(self, pair: Pair, generator: torch.Generator,
             autocast=nullcontext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, pair: Pair) -> dict[str, float]:
        raise NotImplementedError

    def export(self) -> dict[str, nn.Module]:
        """Keyword arguments for :func:`~synthmorph_nipype.models.checkpoint.save_checkpoint`."""
        raise NotImplementedError


class AffineTask(Task):
    """The feature detector (affine or rigid), trained on label overlap after the fitted
    transform, in both directions, at half the training resolution."""

    name = "affine"

    def __init__(self, config: AffineConfig, similarity: str = "label_mse",
                 loss_stride: int = 2, supervised_weight: float = 0.0):
        self.model = AffineDetector(config)
        init_weights(self.model)
        self.similarity = SIMILARITIES[similarity]
        self.stride = int(loss_stride)
        self.supervised_weight = float(supervised_weight)

    def matrix(self, pair: Pair, autocast=nullcontext) -> torch.Tensor:
        """Fixed -> moving voxel map ``(4, 4)`` (float64) predicted for ``pair``."""
        with autocast():
            res = self.model(pair.image_1, pair.image_2, half_res=False)
        return centred_to_index(res.matrix, pair.image_1.shape[2])[0]

    def _overlaps(self, pair: Pair, mat: torch.Tensor, stride: int):
        shape = pair.image_1.shape[2:]
        s = stride
        moved_1 = warp_onehot(pair.onehot_1, _mapped(mat, shape, s))
        moved_2 = warp_onehot(pair.onehot_2, _mapped(torch.linalg.inv(mat), shape, s))
        return ((moved_1, pair.onehot_2[..., ::s, ::s, ::s]),
                (moved_2, pair.onehot_1[..., ::s, ::s, ::s]))

    def loss(self, pair, generator, autocast=nullcontext):
        mat = self.matrix(pair, autocast)
        (m1, f1), (m2, f2) = self._overlaps(pair, mat, self.stride)
        sim = 0.5 * (self.similarity(m1, f1) + self.similarity(m2, f2))
        terms = {"sim": float(sim.detach())}
        loss = sim
        if self.supervised_weight and pair.truth is not None:
            dist = map_distance(mat, pair.truth.to(mat), pair.onehot_2, self.stride)
            loss = loss + self.supervised_weight * dist
            terms["dist"] = float(dist.detach())
        return loss, terms

    @torch.no_grad()
    def evaluate(self, pair):
        mat = self.matrix(pair)
        (m1, f1), _ = self._overlaps(pair, mat, 1)
        out = {"dice": float(soft_dice(m1, f1)),
               "dice_before": float(soft_dice(pair.onehot_1, pair.onehot_2))}
        if pair.truth is not None:
            out["error_vox"] = _mean_error(mat, pair.truth.to(mat), pair.onehot_2)
        return out

    def export(self):
        return {"affine": self.model}


def map_distance(mat: torch.Tensor, truth: torch.Tensor, onehot_fixed: torch.Tensor,
                 stride: int = 1) -> torch.Tensor:
    """Mean distance (voxels) between predicted and true maps over the fixed image's
    labelled voxels (the brain, for real label maps), differentiable in ``mat``; every
    ``stride``-th voxel. All voxels count when none is labelled."""
    shape = onehot_fixed.shape[2:]
    s = stride
    mask = onehot_fixed[0, 1:, ::s, ::s, ::s].sum(0) > 0.5
    diff = _mapped(mat, shape, s) - _mapped(truth, shape, s)
    dist = (diff.pow(2).sum(-1) + 1e-12).sqrt()
    return dist[mask].mean() if bool(mask.any()) else dist.mean()


def _mean_error(mat: torch.Tensor, truth: torch.Tensor, onehot_fixed: torch.Tensor) -> float:
    """Mean distance (voxels) between predicted and true maps over the labelled voxels."""
    return float(map_distance(mat, truth, onehot_fixed))


class DeformTask(Task):
    """The hyper U-Net on affinely aligned pairs: a symmetric SVF ``0.5 (f(1,2) - f(2,1))``
    integrated both ways; ``(1 - lambda) * similarity + lambda * regularizer`` with one
    ``lambda ~ U(0, 1)`` per step fed to the hypernetwork.

    With ``config.lambda_head`` (spatially varying regularisation, Chen et al.) the network
    is a plain U-Net that also predicts a voxel-wise weight map ``lambda(x)`` (the mean of
    both passes), and the objective is ``similarity + penalty_weight * mean(lambda |grad
    u|^2) + (1 - prior_alpha) * mean(log lambda)`` (a Beta(alpha, 1) prior on lambda).

    ``passes`` > 1 trains the U-Net as the cascade the engine runs
    (:func:`~synthmorph_nipype.engine.network.cascade_svf`): each later pass sees both
    images warped half-way along the SVF so far and adds its own; the loss sees the sum.
    The half-way warps carry no gradient (each pass learns from what the sum misses).

    ``distill`` (:class:`~synthmorph_nipype.training.distill.Distillation`) makes some
    steps distillation steps: the end-point error between the U-Net's displacement and
    the one the test-time refinement reaches from it is added to the similarity term.
    """

    name = "joint"

    def __init__(self, config: UNetConfig, similarity: str = "label_mse",
                 regularizer: str = "grad_l2", steps: int = 7, loss_stride: int = 2,
                 prior_alpha: float = 1.1, penalty_weight: float = 1.0,
                 supervised_weight: float = 0.0, passes: int = 1,
                 distill: Distillation | None = None):
        if passes < 1:
            raise ValueError(f"a cascade runs the network at least once, got {passes} passes")
        self.supervised_weight = float(supervised_weight)
        self.passes = int(passes)
        self.distill = distill if distill is not None else Distillation()
        self.spatial = config.lambda_head
        if self.spatial and self.distill.weight:
            raise ValueError("distillation trains the hypernetwork U-Net, not a lambda head")
        self.model = UNet(config) if self.spatial else HyperUNet(config)
        init_weights(self.model)
        # start near the identity: the last layer predicts an almost zero SVF (and, with a
        # lambda head, lambda = 0.5 everywhere)
        last = self.model.convs[-1]
        params = ((last.weight, last.bias) if self.spatial else
                  (last.hyperkernel.weight, last.hyperkernel.bias, last.hyperbias.weight,
                   last.hyperbias.bias))
        for p in params:
            nn.init.normal_(p, std=1e-5)
        self.similarity = SIMILARITIES[similarity]
        self.regularizer = REGULARIZERS[regularizer]
        self.steps = int(steps)
        self.stride = int(loss_stride)
        self.prior_alpha, self.penalty_weight = float(prior_alpha), float(penalty_weight)

    def _svf(self, image_1: torch.Tensor, image_2: torch.Tensor, lam, autocast):
        """One symmetric pass: the SVF (channels last) and the lambda head's map."""
        x12, x21 = torch.cat([image_1, image_2], 1), torch.cat([image_2, image_1], 1)
        with autocast():
            if self.spatial:
                a, b = self.model(x12), self.model(x21)
            else:
                a, b = self.model(x12, lam), self.model(x21, lam)
        (a, lam_a), (b, lam_b) = split_lambda(a.float()), split_lambda(b.float())
        lam_map = None if lam_a is None else 0.5 * (lam_a + lam_b)
        return (0.5 * (a - b))[0].permute(1, 2, 3, 0), lam_map

    def velocity(self, pair: Pair, lam: float | torch.Tensor, autocast=nullcontext):
        """The SVF (channels last, voxels) of the cascade and a lambda head's weight map
        ``(1, 1, *s)`` (else None)."""
        grid = voxel_grid(pair.image_1.shape[2:], device=pair.image_1.device)
        return cascade(lambda a, b: self._svf(a, b, lam, autocast), pair.image_1,
                       pair.image_2, self.passes,
                       lambda image, disp: _warped(image, grid + disp))

    def fields(self, pair: Pair, lam: float | torch.Tensor, autocast=nullcontext):
        """Displacements (channels last, voxels) fixed -> moving and moving -> fixed, and
        the voxel-wise weight map ``(1, 1, *s)`` of a lambda head (else None)."""
        svf, lam_map = self.velocity(pair, lam, autocast)
        return integrate_svf(svf, self.steps), integrate_svf(-svf, self.steps), lam_map

    @staticmethod
    def _moved(pair: Pair, d1: torch.Tensor, d2: torch.Tensor, s: int = 1):
        """Moved one-hot maps and the fixed ones they match, on every ``s``-th voxel."""
        grid = voxel_grid(d1.shape[:3], dtype=d1.dtype, device=d1.device)
        sub = (slice(None, None, s),) * 3
        return ((warp_onehot(pair.onehot_1, (grid + d1)[sub]), pair.onehot_2[(..., *sub)]),
                (warp_onehot(pair.onehot_2, (grid + d2)[sub]), pair.onehot_1[(..., *sub)]))

    def _compared(self, pair: Pair, d1: torch.Tensor, d2: torch.Tensor):
        """What the similarity compares: (moved, fixed) both ways."""
        return self._moved(pair, d1, d2, self.stride)

    def loss(self, pair, generator, autocast=nullcontext, lam: float | None = None):
        """The objective on ``pair``; ``lam`` ~ U(0, 1) drawn with ``generator`` unless
        given (a distillation step, drawn only when ``lam`` is not given, uses the
        distillation's ``net_lambda``)."""
        distilling = False
        if self.distill.weight and lam is None:  # (no draw otherwise: older runs resume
            # as they were)
            distilling = float(torch.rand((), generator=generator)) < self.distill.prob
            if distilling:
                lam = self.distill.net_lambda
        if lam is None:
            lam = float(torch.rand((), generator=generator))
        svf, lam_map = self.velocity(pair, lam, autocast)
        d1, d2 = integrate_svf(svf, self.steps), integrate_svf(-svf, self.steps)
        (m1, f1), (m2, f2) = self._compared(pair, d1, d2)
        sim = 0.5 * (self.similarity(m1, f1) + self.similarity(m2, f2))
        epe = teach = None
        if self.supervised_weight and pair.disp_truth is not None:
            epe = end_point_error(d1, pair.disp_truth, pair.onehot_2, self.stride)
            sim = sim + self.supervised_weight * epe
        if distilling:
            target = integrate_svf(teacher_svf(svf, pair.image_1, pair.image_2, pair.onehot_1,
                                               pair.onehot_2, self.distill, self.steps),
                                   self.steps)
            teach = end_point_error(d1, target, pair.onehot_2, self.stride)
            sim = sim + self.distill.weight * teach
        u1, u2 = d1.permute(3, 0, 1, 2)[None], d2.permute(3, 0, 1, 2)[None]
        if lam_map is not None:
            reg = 0.5 * (weighted_grad_l2(u1, lam_map) + weighted_grad_l2(u2, lam_map))
            prior = beta_prior(lam_map, self.prior_alpha)
            loss = sim + self.penalty_weight * reg + prior
            return loss, {"sim": float(sim.detach()), "reg": float(reg.detach()),
                          "lambda": float(lam_map.detach().mean())}
        reg = 0.5 * (self.regularizer(u1) + self.regularizer(u2))
        loss = (1 - lam) * sim + lam * reg
        terms = {"sim": float(sim.detach()), "reg": float(reg.detach()), "lambda": lam}
        if self.supervised_weight:  # the same columns every step (NaN: no truth)
            terms["epe"] = float("nan") if epe is None else float(epe.detach())
            # the identity's error on the same pair: below it, the network has learnt
            terms["epe_identity"] = float("nan") if epe is None else float(end_point_error(
                torch.zeros_like(d1), pair.disp_truth, pair.onehot_2, self.stride))
        if self.distill.weight:  # the refined field's distance from the U-Net's (NaN: none)
            terms["distill"] = float("nan") if teach is None else float(teach.detach())
        return loss, terms

    @torch.no_grad()
    def evaluate(self, pair, lam: float = 0.5):
        d1, d2, lam_map = self.fields(pair, lam)
        (m1, f1), _ = self._moved(pair, d1, d2)
        out = {"dice": float(soft_dice(m1, f1)),
               "dice_before": float(soft_dice(pair.onehot_1, pair.onehot_2)),
               "folding_pct": folding_percent(d1)}
        if lam_map is not None:
            out["lambda_mean"] = float(lam_map.mean())
        return out

    def export(self):
        return {"deform": self.model}


def _warped(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """An image ``(1, C, *s)`` sampled (trilinear) at ``points`` ``(*s, 3)``, channel by
    channel."""
    return torch.stack([sample_linear(c, points) for c in image[0].float()])[None].to(image)


def end_point_error(disp: torch.Tensor, truth: torch.Tensor, onehot_fixed: torch.Tensor,
                    stride: int = 1) -> torch.Tensor:
    """Mean end-point error (voxels) of a displacement ``(*s, 3)`` against the truth over
    the fixed image's labelled voxels (all voxels when none is labelled)."""
    sub = (slice(None, None, stride),) * 3
    mask = onehot_fixed[0, 1:][(slice(None), *sub)].sum(0) > 0.5
    err = ((disp[sub] - truth[sub].to(disp)).pow(2).sum(-1) + 1e-12).sqrt()
    return err[mask].mean() if bool(mask.any()) else err.mean()


class ImageTask(DeformTask):
    """VoxelMorph-style: the hyper U-Net on a user's image pairs (already in their affine
    mid-space), ``(1 - lambda) * image dissimilarity + lambda * regularizer``, both ways."""

    name = "images"

    def __init__(self, config: UNetConfig, similarity: str = "ncc",
                 regularizer: str = "grad_l2", steps: int = 7, **spatial):
        super().__init__(config, regularizer=regularizer, steps=steps, **spatial)
        if similarity not in IMAGE_SIMILARITIES:
            raise ValueError(f"unknown image similarity {similarity!r}, choose from "
                             f"{', '.join(IMAGE_SIMILARITIES)}")
        self.similarity = IMAGE_SIMILARITIES[similarity]

    def _compared(self, pair: Pair, d1: torch.Tensor, d2: torch.Tensor):
        grid = voxel_grid(d1.shape[:3], dtype=d1.dtype, device=d1.device)
        m1 = sample_linear(pair.image_1[0, 0], grid + d1)[None, None]
        m2 = sample_linear(pair.image_2[0, 0], grid + d2)[None, None]
        return (m1, pair.image_2.float()), (m2, pair.image_1.float())

    @torch.no_grad()
    def evaluate(self, pair, lam: float = 0.5):
        d1, d2, lam_map = self.fields(pair, lam)
        (m1, f1), _ = self._compared(pair, d1, d2)
        out = {"similarity": float(self.similarity(m1, f1)),
               "similarity_before": float(self.similarity(pair.image_1, pair.image_2)),
               "folding_pct": folding_percent(d1)}
        if lam_map is not None:
            out["lambda_mean"] = float(lam_map.mean())
        return out


TASKS: dict[str, Callable[..., Task]] = {"affine": AffineTask, "rigid": AffineTask,
                                         "joint": DeformTask, "images": ImageTask}
