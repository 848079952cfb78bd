"""Register two images: conform, run the networks, compose to world-space transforms.

>>> from synthmorph_nipype.engine.register import register  # doctest: +SKIP
>>> result = register(moving_img, fixed_img, models, mode="joint")  # doctest: +SKIP
>>> result.forward   # fixed RAS -> moving RAS: resamples moving onto fixed  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nb
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SynthMorphError
from ..io.images import image_data
from ..ops.grid import affine_points, slabs
from ..ops.sampling import sample_linear
from ..transforms.base import Affine, Chain, DisplacementField, ImageGrid, Transform
from ..vocabulary import AFFINE_MODES, DEFORM_MODES, EXTENTS, MODES, check
from .compose import world_field, world_matrix
from .conform import conform
from .network import run_affine, run_deformable
from .space import net_to_ras
from .weights import Models


@dataclass
class Registration:
    """The result of one registration, as world-space pull-back maps (RAS mm).

    ``forward`` maps fixed points to moving points (resamples the moving image onto the
    fixed grid, as ITK's ``-t``), ``inverse`` maps moving points to fixed points.
    Deformable results are ITK-composite-shaped chains ``[affine, field]``: the field is
    applied first, on the grid of the space the points come from. A direction left out of
    ``register(outputs=...)`` is ``None``.
    """

    mode: str
    moving: ImageGrid
    fixed: ImageGrid
    forward: Chain | None
    inverse: Chain | None
    info: dict = field(default_factory=dict)
    # models with spatially varying regularisation: the voxel-wise weight, on FIXED's grid
    lambda_map: nb.Nifti1Image | None = None


MASK_DILATION_MM = 4.0  # masks grow this much: the similarity sees the edge of the brain


def _conform_mask(mask, net2ras: np.ndarray, extent: int, device) -> torch.Tensor | None:
    """A mask in network space (1 inside, 0 outside), dilated by ``MASK_DILATION_MM``."""
    if mask is None:
        return None
    data = (np.asanyarray(mask.dataobj) > 0).astype(np.float32)
    grid = ImageGrid.from_image(mask)
    out = conform(data, np.linalg.inv(grid.affine) @ net2ras, extent, device,
                  normalize=False)
    radius = int(round(MASK_DILATION_MM))  # network voxels are 1 mm
    out = (out > 0.5).float()[None, None]
    for axis in range(3):  # a cube is three 1-D dilations: 3 (2r + 1), not (2r + 1)^3, reads
        size, pad = [1, 1, 1], [0, 0, 0]
        size[axis], pad[axis] = 2 * radius + 1, radius
        out = F.max_pool3d(out, tuple(size), stride=1, padding=tuple(pad))
    out = out[0, 0]
    if not bool(out.any()):
        raise SynthMorphError(f"{mask.get_filename() or 'mask'}: the mask covers nothing "
                              "inside the network's field of view")
    return out


def register(moving, fixed, models: Models, *, mode: str = "joint", extent: int = 256,
             steps: int = 7, init: Transform | None = None,
             device: torch.device | str = "cpu",
             outputs: tuple[str, ...] = ("forward", "inverse"), refine: int | None = None,
             lam: float = 0.5, similarity: str | None = None,
             refine_affine: int | None = None, moving_mask=None, fixed_mask=None,
             refine_lambda: float | None = None, passes: int | None = None) -> Registration:
    """Register ``moving`` to ``fixed`` (nibabel images, any orientation and voxel size).

    Parameters
    ----------
    moving, fixed : nibabel.spatialimages.SpatialImage
        The 3-D images.
    models : Models
        The networks for ``mode`` (see :func:`~synthmorph_nipype.engine.weights.load_models`);
        the regularisation weight was chosen when loading the deformable network.
    mode : str
        ``affine``, ``rigid``, ``deform`` (images already affinely aligned, or ``init``)
        or ``joint``.
    extent : int
        192 or 256, the network grid size.
    steps : int
        Scaling-and-squaring steps for the SVF.
    init : Transform, optional
        Initial affine transform (fixed RAS -> moving RAS), folded into the moving
        network space; the results include it.
    device : torch.device or str
        Where the networks run.
    outputs : tuple of str
        Which of ``forward`` and ``inverse`` to build (the other is ``None``); a
        deformable direction nobody asked for costs its own world-space field.
    lam : float
        The regularisation weight: a hyper-network's was chosen when it was loaded; here
        it is the refinement's smoothness weight when neither ``refine_lambda`` nor the
        weights give one.
    refine, refine_lambda, similarity : int, float, str
        Test-time refinement of the deformable step: that many optimisation steps of
        ``(1 - refine_lambda) * similarity + refine_lambda * Grad-l2`` on the pair
        (``similarity``: ``ncc``, ``mse``, ``mind``, ``mi`` or ``mind+mi``) on a 4 mm
        grid, then a quarter as many on the 2 mm grid; ``None`` takes what
        the weights recommend (``models.refine``, ``models.refine_lambda`` else ``lam``,
        ``models.refine_similarity``), 0 keeps the network's field.
    refine_affine : int, optional
        Test-time refinement of the affine (or rigid) matrix: N steps at 4 mm, then
        N / 2 at 2 mm, of a symmetric MIND similarity (works across contrasts);
        ``None`` takes what the weights recommend (``models.refine_affine``: 0 for
        FreeSurfer's, the embedded models' model card gives theirs), 0 keeps the
        network's matrix.
    passes : int, optional
        Runs of the deformable network as a cascade, each on the images warped by the
        runs before (:func:`~synthmorph_nipype.engine.network.cascade_svf`); ``None``
        takes what the weights recommend (``models.passes`` for the network alone,
        ``models.refine_passes`` when its field is refined; 1 for FreeSurfer's).
    moving_mask, fixed_mask : nibabel.spatialimages.SpatialImage, optional
        As ANTs' ``-x`` (any grid covering the image; non-zero is inside): the
        refinements' similarity counts only voxels inside them, dilated by
        :data:`MASK_DILATION_MM` (the networks see the whole images).

    Returns
    -------
    Registration
        The world-space transforms and what was run.
    """
    check("mode", mode, MODES)
    check("extent", extent, EXTENTS)
    mov, fix = ImageGrid.from_image(moving), ImageGrid.from_image(fixed)
    fix_net2ras = net_to_ras(fix.center_ras, extent)
    if init is not None:
        init_affine = init.as_affine()
        if init_affine is None:
            raise SynthMorphError("the initial transform must be affine")
        mov_net2ras = init_affine.matrix @ fix_net2ras
    else:
        init_affine = Affine(np.eye(4))
        centre_on = fix if mode == "deform" else mov  # deform: inputs already aligned
        mov_net2ras = net_to_ras(centre_on.center_ras, extent)
    device = torch.device(device)
    inp_1 = conform(image_data(moving), np.linalg.inv(mov.affine) @ mov_net2ras, extent, device)
    inp_2 = conform(image_data(fixed), np.linalg.inv(fix.affine) @ fix_net2ras, extent, device)
    masks = (_conform_mask(moving_mask, mov_net2ras, extent, device),
             _conform_mask(fixed_mask, fix_net2ras, extent, device))
    models.to(device)
    fix_ras2net, mov_ras2net = np.linalg.inv(fix_net2ras), np.linalg.inv(mov_net2ras)
    if refine_affine is None:
        refine_affine = models.refine_affine
    if refine is None:
        refine = models.refine if mode in DEFORM_MODES else 0
    if similarity is None:
        similarity = models.refine_similarity
    if refine_lambda is None:
        refine_lambda = models.refine_weight(lam)
    if passes is None:
        passes = models.cascade(refine) if mode in DEFORM_MODES else 1
    elif mode not in DEFORM_MODES and passes != 1:
        raise SynthMorphError(f"passes applies to the deformable modes (joint, deform), "
                              f"not {mode!r}")
    if passes < 1:
        raise SynthMorphError(f"the deformable network runs at least once, got {passes} "
                              "passes")
    if not 0 <= refine_lambda < 1:
        raise SynthMorphError(f"the refinement's smoothness weight must lie in [0, 1), "
                              f"got {refine_lambda}")
    info = {"mode": mode, "extent": extent, "steps": steps, "device": str(device)}
    if refine_affine and mode != "deform":
        info["refine_affine"] = refine_affine
    if mode in AFFINE_MODES:
        out = run_affine(models.affine, inp_1, inp_2, refine=refine_affine, masks=masks)
        if refine_affine:
            info["refine_affine_loss"] = out.stages["refine_affine_loss"]
        fw = world_matrix(out.out_1, mov_net2ras, fix_ras2net)
        bw = world_matrix(out.out_2, fix_net2ras, mov_ras2net)
        return Registration(mode, mov, fix, Chain([Affine(fw)]), Chain([Affine(bw)]), info)
    detector = models.affine if mode == "joint" else None
    out = run_deformable(models.deform, inp_1, inp_2, steps=steps, detector=detector,
                         refine=refine, lam=refine_lambda, similarity=similarity,
                         refine_affine=refine_affine if detector is not None else 0,
                         masks=masks, inverse="inverse" in outputs, passes=passes)
    if passes > 1:
        info["passes"] = passes
    if "refine_affine_loss" in out.stages:
        info["refine_affine_loss"] = out.stages["refine_affine_loss"]
    if refine:
        info["refine"] = refine
        info["refine_similarity"] = similarity
        info["refine_lambda"] = refine_lambda
        info["refine_loss"] = out.stages["refine_loss"]
        info["refine_fine_loss"] = out.stages["refine_fine_loss"]
    del inp_1, inp_2
    affine = Affine(world_matrix(out.affine_1, mov_net2ras, fix_ras2net))
    if mode == "deform":
        affine = init_affine
    lam_img = None
    if out.lambda_map is not None:  # fixed voxel -> fixed network index -> mid-space grid
        to_mid = np.linalg.inv(out.lambda_to_fixed) @ fix_ras2net @ fix.affine
        lam = np.empty(fix.shape, np.float32)
        for i0, i1 in slabs(fix.shape):
            pts = affine_points(to_mid, fix.shape, device=out.lambda_map.device, rows=(i0, i1))
            lam[i0:i1] = sample_linear(out.lambda_map, pts, boundary="clamp").cpu().numpy()
        lam_img = nb.Nifti1Image(lam, fix.affine)
    forward = inverse = None
    # each direction's field is what its affine leaves (world_field's composite form)
    if "forward" in outputs:
        fw_res = world_field(out.out_1, np.linalg.inv(affine.matrix) @ mov_net2ras,
                             fix_ras2net @ fix.affine, fix.affine, fix.shape)
        forward = Chain([affine, DisplacementField(fix, fw_res)])
    if "inverse" in outputs:
        bw_res = world_field(out.out_2, affine.matrix @ fix_net2ras, mov_ras2net @ mov.affine,
                             mov.affine, mov.shape)
        inverse = Chain([affine.inverse(), DisplacementField(mov, bw_res)])
    return Registration(mode, mov, fix, forward, inverse, info, lam_img)
