"""Run the SynthMorph networks in network space.

All outputs are pull-back maps in network voxel indices: ``out_1`` takes a fixed-network
point to the moving-network point (what the moving image is sampled with), ``out_2`` the
reverse. Matrix modes give 4x4 matrices; deformable modes give displacements ``u`` with
target ``x + u(x)`` (:class:`HalfResField`: callable at points, ``full()`` on the grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..models.affine import AffineDetector
from ..models.joint import UNet, split_lambda
from ..ops.cascade import cascade
from ..ops.grid import affine_points, centred_to_index, index_to_centred, voxel_grid
from ..ops.integrate import integrate_svf, upsample_field
from ..ops.linalg import sqrtm
from ..ops.sampling import sample_linear, sample_separable
from ..vocabulary import fine_steps
from .refine import pooled, refine_matrix, refine_svf

HALF = np.diag([2.0, 2.0, 2.0, 1.0])  # half-resolution index -> full-resolution index
# test-time refinement of the SVF runs on its grid pooled this much (4 mm): eight times
# cheaper steps than at the network's 2 mm, where a CPU needs seconds for one
REFINE_POOL = 2
# scaling-and-squaring steps inside the refinement loop (at most the run's own): on its
# 4 mm grid four keep the same Dice as seven on the held-out pairs, at 4/7 of the cost of
# the integrations that dominate a step; the refined SVF is then integrated as usual.
# Session 18, with the 2 mm level: three gave the template pairs the same Dice (0.875 /
# 0.855 / 0.904 against 0.875 / 0.856 / 0.904) and the held-out pairs a mean of 0.716
# (0.717), for about 0.5 s less of a 2-thread run
REFINE_INT_STEPS = 3
# the refinement differentiates its loss in the integrated displacements and takes that
# for the SVF's gradient (no backward pass through the squaring): a step costs about 0.4
# of an exact one, and 45 such steps beat 30 exact ones on the held-out pairs (Dice
# 0.631 against 0.627, session 9)
REFINE_EXACT_GRADIENT = False
# the refinement optimises the box of the pair's content (or its masks) grown by this many
# voxels of its grid (4 mm), not the whole network grid, most of which is background
REFINE_CROP_MARGIN = 4
# Adam's rate of the SVF refinement (voxels of its 4 mm grid per step, about): with the
# MIND U-Net, 0.1 and a smoothness weight of 0.85 (the embedded weights' refine_lambda)
# gave the held-out pairs' best mean Dice, 0.654 against 0.631 at 0.05 and 0.5 (session 12).
# Session 15: with Adam's floor (refine.ADAM_FLOOR), which keeps voxels without gradient
# still, the same Dice needs larger steps: 20 steps after one U-Net pass gave 0.638 /
# 0.654 / 0.657 / 0.656 at 0.1 / 0.4 / 0.6 / 1.0 (1.0 folded a few voxels), where 30
# steps at 0.1 without the floor after three passes gave 0.654
REFINE_RATE = 0.6
# Adam's rate (voxels of the 2 mm grid) of the steps the deformable refinement ends with
# on the U-Net's input grid, a quarter as many as on its 4 mm grid
# (:func:`~synthmorph_nipype.vocabulary.fine_steps`): with them the template pairs' Dice
# (MIND) rose from 0.803 / 0.840 / 0.892 to 0.850 / 0.852 / 0.900 (session 18), where
# more 4 mm steps had left it where it was; 0.1 and 0.25 lowered it (0.870 / 0.877 mean
# against 0.878)
FINE_RATE = 0.6


@dataclass
class NetworkOutput:
    out_1: np.ndarray | HalfResField
    out_2: np.ndarray | HalfResField | None  # None: the inverse was not asked for
    affine_1: np.ndarray  # the affine part of out_1 in full-resolution network indices
    stages: dict = field(default_factory=dict)  # intermediate arrays, for inspection
    # spatially varying models: the weight map on the mid-space half-resolution grid, and
    # the map from that grid to the fixed image's full-resolution network indices
    lambda_map: torch.Tensor | None = None
    lambda_to_fixed: np.ndarray | None = None


def _batch(x: torch.Tensor) -> torch.Tensor:
    return x[None, None]


Masks = tuple[torch.Tensor | None, torch.Tensor | None]


def level_steps(iterations: int) -> tuple[int, int]:
    """Steps of the affine refinement's 4 mm and 2 mm levels for ``--refine-affine N``:
    N, then N / 2 (the 2 mm level's steps cost more and start closer; 60 / 30 left the
    held-out motion pairs within 0.4 mm).

    >>> level_steps(60), level_steps(1)
    ((60, 30), (1, 1))
    """
    return int(iterations), max(1, int(iterations) // 2)


def _refined(matrix: np.ndarray, inp_1: torch.Tensor, inp_2: torch.Tensor, rigid: bool,
             iterations: int, stages: dict, masks: Masks = (None, None)) -> np.ndarray:
    """``matrix`` (full-resolution indices) after test-time refinement, if asked for."""
    if iterations <= 0:
        return matrix
    refined, history = refine_matrix(matrix, inp_1, inp_2, iterations=level_steps(iterations),
                                     rigid=rigid, mask_1=masks[0], mask_2=masks[1])
    stages["refine_affine_loss"] = history
    return refined


@torch.no_grad()
def run_affine(detector: AffineDetector, inp_1: torch.Tensor, inp_2: torch.Tensor,
               keep: bool = False, refine: int = 0, masks: Masks = (None, None)
               ) -> NetworkOutput:
    """Affine or rigid registration of two conformed images ``(e, e, e)``; ``refine`` > 0
    optimises the matrix on the pair for that many steps (see
    :func:`~synthmorph_nipype.engine.refine.refine_matrix`), its similarity restricted to
    ``masks`` (conformed like the images; None: everywhere)."""
    extent = inp_1.shape[0]
    res = detector(_batch(inp_1), _batch(inp_2), half_res=True)
    stages: dict = {}
    out_1 = centred_to_index(res.matrix, extent)[0].cpu().numpy()
    out_1 = _refined(out_1, inp_1, inp_2, detector.config.rigid, refine, stages, masks)
    out_2 = np.linalg.inv(out_1)
    if keep:
        stages |= {"feat_1": res.feat_1, "feat_2": res.feat_2, "cen_1": res.cen_1,
                   "cen_2": res.cen_2, "chan_weights": res.weights}
    return NetworkOutput(out_1, out_2, out_1, stages)


def _svf(unet: UNet, half_1: torch.Tensor, half_2: torch.Tensor, coarse: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetrised SVF, channels last: ``0.5 * (f(1, 2) - f(2, 1))``, and the mean of the
    two passes' weight maps ``(X, Y, Z)`` for a U-Net with a lambda head (else None); run
    one direction at a time so the two passes never hold their activations together.
    ``coarse``: the images are on the U-Net's own (pooled) grid, and so is the SVF."""
    a, lam_a = split_lambda(unet(torch.cat([_batch(half_1), _batch(half_2)], 1), coarse))
    b, lam_b = split_lambda(unet(torch.cat([_batch(half_2), _batch(half_1)], 1), coarse))
    lam = None if lam_a is None else (0.5 * (lam_a + lam_b))[0, 0]
    return (0.5 * (a - b))[0].permute(1, 2, 3, 0).contiguous(), lam


def cascade_svf(unet: UNet, def_1: torch.Tensor, def_2: torch.Tensor, passes: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The symmetric SVF of ``passes`` runs of the U-Net
    (:func:`~synthmorph_nipype.ops.cascade.cascade`: each run after the first sees both
    images warped half-way along the SVF so far and adds its own), on the U-Net's own
    grid: for a U-Net that pools its inputs (``prepool``, trained on a coarser grid) the
    SVF stays on the pooled grid, in its voxels, and the half-way warps, integrated
    there, are upsampled to warp the images on theirs. The lambda map (spatially varying
    models) is the first run's, on the SVF's grid.

    >>> from synthmorph_nipype.models.joint import UNet, UNetConfig
    >>> net = UNet(UNetConfig(enc_nf=(4, 4), dec_nf=(4, 4), add_nf=(4,)))
    >>> img = torch.rand(16, 16, 16)
    >>> one, _ = cascade_svf(net, img, img.flip(0))
    >>> two, _ = cascade_svf(net, img, img.flip(0), passes=2)
    >>> one.shape == two.shape and not torch.equal(one, two)
    True
    """
    pool = unet.config.prepool
    grid = voxel_grid(def_1.shape, device=def_1.device)

    def run_pass(image_1, image_2):
        return _svf(unet, pooled(image_1, pool), pooled(image_2, pool), pool > 1)

    def warp(image, disp):
        return sample_linear(image, grid + upsample_field(disp, image.shape, pool))
    return cascade(run_pass, def_1, def_2, passes, warp)


def _half_total(disp: torch.Tensor, half_aff: np.ndarray) -> torch.Tensor:
    """Total map on the half-resolution grid into full-resolution indices, minus ``y``:
    ``H (w + d(w)) - y`` with ``w = H y / 2``."""
    shape = disp.shape[:3]
    w = affine_points(np.diag([0.5, 0.5, 0.5, 1.0]) @ half_aff, shape, device=disp.device)
    target = w + sample_linear(disp, w, boundary="clamp")
    m = torch.as_tensor(half_aff[:3], dtype=disp.dtype, device=disp.device)
    return target @ m[:, :3].T + m[:, 3] - voxel_grid(shape, device=disp.device)


@dataclass(frozen=True)
class HalfResField:
    """A full-resolution displacement kept as the half-resolution total map it comes
    from: at network point ``x``, ``u(x) = half_tot(c / 2) - c / 2`` with ``c`` = ``x``
    clamped to the grid (half-resolution coordinates clamped too, so the last index
    carries the official half-voxel offset). Calling it at points interpolates once on
    the half-resolution grid; :meth:`full` builds the ``(e, e, e, 3)`` array, whose linear
    interpolation gives the same values (a trilinear function is reproduced exactly by
    the trilinear interpolation of its values on a finer lattice).
    """

    half_tot: torch.Tensor
    extent: int

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        c = 0.5 * points.clamp(0, self.extent - 1)
        return sample_linear(self.half_tot, c, boundary="clamp") - c

    @property
    def device(self) -> torch.device:
        return self.half_tot.device

    def full(self) -> torch.Tensor:
        return self(voxel_grid((self.extent,) * 3, device=self.device))

    def separable(self, coords: list[torch.Tensor], perm) -> torch.Tensor:
        """``u`` on a grid whose points' network coordinate along axis ``perm[b]``
        depends on the index along its axis ``b`` only (``coords[b]``, 1-D, as
        :func:`~synthmorph_nipype.ops.sampling.axis_coordinates` gives): the same values
        as calling it at those points, by three 1-D interpolations
        (:func:`~synthmorph_nipype.ops.sampling.sample_separable`) instead of one
        gather per point: ``(*lengths, 3)``."""
        half = [0.5 * c.to(self.device).clamp(0, self.extent - 1) for c in coords]
        out = sample_separable(self.half_tot, half, perm, boundary="clamp")
        for b, a in enumerate(perm):  # minus c: its component a varies along axis b
            view = [1, 1, 1]
            view[b] = -1
            out[..., a] -= half[b].to(out.dtype).view(view)
        return out


@torch.no_grad()
def deformable_inputs(inp_1: torch.Tensor, inp_2: torch.Tensor,
                      detector: AffineDetector | None = None, refine_affine: int = 0,
                      stages: dict | None = None, masks: Masks = (None, None)):
    """The half-resolution inputs of the deformable network: both images resampled into
    the affine mid-space the detector finds (or simply subsampled without a detector).

    Returns ``def_1, def_2`` and the maps ``half_aff_1, half_aff_2`` from their grids to
    full-resolution network indices, and ``affine_1``, the affine part of the fixed ->
    moving map in full-resolution indices (refined on the pair for ``refine_affine``
    steps, the loss history going to ``stages``).
    """
    half = inp_1.shape[0] // 2
    if detector is None:
        return inp_1[::2, ::2, ::2], inp_2[::2, ::2, ::2], HALF, HALF, np.eye(4)
    res = detector(_batch(inp_1[::2, ::2, ::2]), _batch(inp_2[::2, ::2, ::2]), half_res=False)
    mat = res.matrix
    if refine_affine > 0:
        full = HALF @ centred_to_index(mat, half)[0].cpu().numpy() @ np.linalg.inv(HALF)
        full = _refined(full, inp_1, inp_2, detector.config.rigid, refine_affine,
                        {} if stages is None else stages, masks)
        index = torch.as_tensor(np.linalg.inv(HALF) @ full @ HALF, dtype=mat.dtype)
        mat = index_to_centred(index, half)[None].to(mat.device)
    mid_1 = centred_to_index(sqrtm(mat), half)[0].cpu().numpy()
    mid_2 = centred_to_index(sqrtm(torch.linalg.inv(mat)), half)[0].cpu().numpy()
    half_aff_1, half_aff_2 = HALF @ mid_1, HALF @ mid_2
    affine_1 = HALF @ centred_to_index(mat, half)[0].cpu().numpy() @ np.linalg.inv(HALF)
    grid = (half,) * 3
    def_1 = sample_linear(inp_1, affine_points(half_aff_1, grid, device=inp_1.device))
    def_2 = sample_linear(inp_2, affine_points(half_aff_2, grid, device=inp_2.device))
    return def_1, def_2, half_aff_1, half_aff_2, affine_1


def _refine_level(svf, img_1, img_2, masks, iterations, lam, similarity, steps, pool,
                  weight, rate):
    """:func:`~synthmorph_nipype.engine.refine.refine_svf` with the engine's settings."""
    return refine_svf(svf, img_1, img_2, iterations=iterations, lam=lam,
                      similarity=similarity, steps=min(steps, REFINE_INT_STEPS),
                      lr=rate, pool=pool, exact_gradient=REFINE_EXACT_GRADIENT,
                      crop_margin=REFINE_CROP_MARGIN, weight=weight, mask_1=masks[0],
                      mask_2=masks[1])


@torch.no_grad()
def run_deformable(unet: UNet, inp_1: torch.Tensor, inp_2: torch.Tensor, *, steps: int = 7,
                   detector: AffineDetector | None = None, keep: bool = False,
                   refine: int = 0, lam: float = 0.5, similarity: str = "ncc",
                   refine_affine: int = 0, masks: Masks = (None, None),
                   inverse: bool = True, passes: int = 1) -> NetworkOutput:
    """Deformable (``detector=None``: the inputs are already affinely aligned) or joint
    registration, with the deformable step in the affine mid-space. ``refine`` > 0
    optimises the network's SVF on the pair for that many steps (see
    :func:`~synthmorph_nipype.engine.refine.refine_svf`), ``refine_affine`` > 0 the
    detector's matrix first; both refinements count the similarity inside ``masks``
    only (conformed like the images; None: everywhere). ``inverse=False`` leaves
    ``out_2`` None (its integration is the costliest step after the refinements).
    ``passes`` > 1 runs the U-Net as a cascade (:func:`cascade_svf`)."""
    extent = inp_1.shape[0]
    stages: dict = {}
    def_1, def_2, half_aff_1, half_aff_2, affine_1 = deformable_inputs(
        inp_1, inp_2, detector, refine_affine, stages, masks)
    mid = tuple(None if m is None or refine <= 0 else
                sample_linear(m, affine_points(aff, def_1.shape, device=m.device))
                for m, aff in zip(masks, (half_aff_1, half_aff_2), strict=True))
    # a U-Net that pools its inputs (trained on a coarser grid) runs there, cascade,
    # refinement and integration included: its fields are smooth at that scale, and
    # each of those steps costs pool**3 times less; the displacements are upsampled last
    svf, lam_map = cascade_svf(unet, def_1, def_2, passes)
    pool = unet.config.prepool
    if refine > 0:
        net_1, net_2, net_mid = (pooled(def_1, pool), pooled(def_2, pool),
                                 tuple(pooled(m, pool) for m in mid))
        # a spatially varying model's map weights the smoothness voxel by voxel
        svf, history = _refine_level(svf, net_1, net_2, net_mid, refine, lam, similarity,
                                     steps, max(1, REFINE_POOL // pool), lam_map,
                                     REFINE_RATE)
        stages["refine_loss"] = history
    fine = fine_steps(refine)
    if lam_map is not None and pool > 1:  # on the half-resolution grid, as the U-Net's
        lam_map = F.interpolate(lam_map[None, None], scale_factor=pool, mode="trilinear",
                                align_corners=False)[0, 0]
    if fine:  # a last few steps on the 2 mm grid, where the field is then integrated
        svf, pool = upsample_field(svf, def_1.shape, pool), 1  # (the SVF is linear)
        svf, history = _refine_level(svf, def_1, def_2, mid, fine, lam, similarity, steps,
                                     1, lam_map, FINE_RATE)
        stages["refine_fine_loss"] = history
    disp_1 = upsample_field(integrate_svf(svf, steps), def_1.shape, pool)
    disp_2 = (upsample_field(integrate_svf(-svf, steps), def_1.shape, pool)
              if inverse or keep else None)
    tot_1 = _half_total(disp_1, half_aff_1)
    tot_2 = None if disp_2 is None else _half_total(disp_2, half_aff_2)
    if keep:
        stages |= {"half_aff_1": half_aff_1, "half_aff_2": half_aff_2, "def_inp_1": def_1,
                   "def_inp_2": def_2, "svf_1": svf, "half_def_1": disp_1,
                   "half_def_2": disp_2, "half_tot_1": tot_1, "half_tot_2": tot_2}
    del disp_1, disp_2, svf
    return NetworkOutput(HalfResField(tot_1, extent),
                         HalfResField(tot_2, extent) if inverse else None, affine_1,
                         stages, lam_map, None if lam_map is None else half_aff_2)

