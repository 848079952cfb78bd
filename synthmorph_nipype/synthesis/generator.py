"""Synthetic training images from label maps (SynthMorph's generator), batched in torch.

Everything works on batches ``(B, X, Y, Z)`` of label maps (``long``) or ``(B, C, X, Y, Z)``
float images, on the labels' device (CPU or CUDA), and draws every random number from
an explicit :class:`torch.Generator`: the same generator state gives the same output.
The numbers are drawn on the generator's device and moved to the data's device, so a
CPU generator also drives CUDA data (reproducibly, at the cost of a copy).

Every random parameter is drawn whether or not the configuration uses it, in a fixed
order, so switching one augmentation off (or changing a probability) leaves all other
draws of a call unchanged: ``flip_prob=0`` and ``flip_prob=1`` give the same pair up to
the flip.

Spatial conventions are the package's: voxel indices in array order ``(i, j, k)``;
transforms are pull-back maps (output voxel -> input voxel). A transform pair
``(affine, disp)`` maps output voxel ``x`` to input voxel ``affine @ (x + disp(x))``.

Ranges (SynthMorph / neurite ``labels_to_image``): label means U(0, 1), per-label noise
std U(0.1, 0.2), blur, multiplicative bias field of FWHM 32-64 mm, gamma ``exp(N(0, s))``
clipped to [0.5, 1.5], thick slices of 1-8 mm along a random axis, slab cropping, affine
(shift 30 mm, rotation 45 deg, scale 10 %, shear 0.1) and integrated Perlin-like SVF
warps; each image of a pair gets its own deformation and contrast; images are min-max
normalised to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from ..ops.grid import voxel_grid
from ..ops.integrate import integrate_svf
from ..ops.rotation import rotation
from ..ops.sampling import sample_nearest

__all__ = [
    "SynthConfig",
    "deform_labels",
    "gaussian_blur",
    "labels_to_image",
    "random_affine",
    "random_bias_field",
    "random_svf",
    "random_svf_warp",
    "reduce_resolution",
    "remove_labels",
    "sample_pair",
    "strip_labels",
]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class SynthConfig:
    """Ranges and probabilities of the synthesis. Lengths are in millimetres and are
    converted to voxels with ``voxel_size`` (one number, or three for the array axes).

    Setting a range to zero (or a probability to zero) switches that augmentation off;
    :meth:`identity` switches everything off.
    """

    voxel_size: float | tuple[float, float, float] = 1.0
    # affine: uniform in [-x, x] per axis (scale: factor 1 + U(-x, x))
    shift_mm: float = 30.0
    rotate_deg: float = 45.0
    scale: float = 0.1
    shear: float = 0.1
    # SVF warps: per scale, velocity std ~ U(0, warp_std_mm); noise on control grids of
    # spacing (= FWHM of the trilinear basis) warp_fwhm_mm, summed, integrated
    warp_std_mm: float = 3.0
    warp_fwhm_mm: tuple[float, ...] = (16.0, 32.0)
    warp_steps: int = 7
    warp_downsample: int = 2  # integrate on a grid this many times coarser
    # intensities: per-label mean ~ U(mean_min, mean_max), per-label noise std ~ U(...)
    mean_min: float = 0.0
    mean_max: float = 1.0
    noise_min: float = 0.1
    noise_max: float = 0.2
    zero_background_prob: float = 0.2  # label 0 gets intensity 0 (no noise)
    blur_max_mm: float = 1.0  # gaussian sigma per axis ~ U(0, blur_max_mm)
    # bias field: exp(N(0, s)) on a control grid, s ~ U(0, bias_std), FWHM ~ U(range)
    bias_std: float = 0.3
    bias_fwhm_mm: tuple[float, float] = (32.0, 64.0)
    # gamma: exponent exp(N(0, gamma_std)) clipped to [gamma_min, gamma_max]
    gamma_std: float = 0.25
    gamma_min: float = 0.5
    gamma_max: float = 1.5
    # resolution loss: slice thickness ~ U(res_min_mm, res_max_mm) along a random axis
    res_prob: float = 0.5
    res_min_mm: float = 1.0
    res_max_mm: float = 8.0
    # cropping: zero a slab of width U(0, crop_max) x axis length at one end of an axis
    crop_prob: float = 0.3
    crop_max: float = 0.2
    # skull on/off: these labels become background (0) with probability skull_prob
    skull_labels: tuple[int, ...] = ()
    skull_prob: float = 0.5
    # flips: each axis flipped with this probability, the same for the whole pair
    flip_prob: float = 0.5

    @classmethod
    def identity(cls, **changes) -> SynthConfig:
        """No deformation and no augmentation: an image is the normalised per-label means."""
        off = dict(shift_mm=0.0, rotate_deg=0.0, scale=0.0, shear=0.0, warp_std_mm=0.0,
                   noise_min=0.0, noise_max=0.0, zero_background_prob=0.0, blur_max_mm=0.0,
                   bias_std=0.0, gamma_std=0.0, res_prob=0.0, crop_prob=0.0, skull_prob=0.0,
                   flip_prob=0.0)
        off.update(changes)
        return cls(**off)

    def replace(self, **changes) -> SynthConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def voxel_mm(self) -> tuple[float, float, float]:
        """The voxel size as three floats."""
        vs = self.voxel_size
        if isinstance(vs, (int, float)):
            return (float(vs),) * 3
        vs = tuple(float(v) for v in vs)
        if len(vs) != 3:
            raise ValueError(f"voxel_size needs 1 or 3 values, got {vs}")
        return vs

    def __post_init__(self):
        names = {f.name for f in fields(self)}
        for name in names & {"res_prob", "crop_prob", "skull_prob", "flip_prob",
                             "zero_background_prob"}:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        if min(self.voxel_mm()) <= 0:
            raise ValueError("voxel_size must be positive")
        if self.warp_steps < 0:
            raise ValueError("warp_steps must be >= 0")
        if self.warp_downsample < 1:
            raise ValueError("warp_downsample must be >= 1")


# ----------------------------------------------------------------------------- random draws

def _device(generator: torch.Generator, device) -> torch.device:
    return torch.device(device) if device is not None else generator.device


def _rand(generator, shape, device) -> torch.Tensor:
    """U[0, 1) float32 drawn on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(generator, shape, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _uniform(generator, shape, lo, hi, device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(generator, shape, device)


def _randint(generator, high, shape, device) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator, device=generator.device).to(device)


def _shape3(shape) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a 3-D shape, got {shape}")
    return shape


# ----------------------------------------------------------------------------- affine

def random_affine(batch: int, shape, config: SynthConfig, generator: torch.Generator, *,
                  device=None) -> torch.Tensor:
    """Random voxel-space pull-back matrices ``(B, 4, 4)`` (float32) about the centre.

    In millimetres, with ``c`` the volume centre, an output point ``x`` maps to
    ``R @ U @ (x - c) + c + t``: ``R`` a rotation (``Rz Ry Rx``, angles
    U(-rotate_deg, rotate_deg)), ``U = diag(s) @ [[1, h0, h1], [0, 1, h2], [0, 0, 1]]``
    with scales ``s = 1 + U(-scale, scale)`` and shears ``h ~ U(-shear, shear)``, and a
    shift ``t ~ U(-shift_mm, shift_mm)`` per axis. The matrix returned acts on voxel
    indices (the millimetre map conjugated by the voxel size).
    """
    shape = _shape3(shape)
    device = _device(generator, device)
    angles = _uniform(generator, (batch, 3), -config.rotate_deg, config.rotate_deg, device)
    scales = 1.0 + _uniform(generator, (batch, 3), -config.scale, config.scale, device)
    shears = _uniform(generator, (batch, 3), -config.shear, config.shear, device)
    shifts = _uniform(generator, (batch, 3), -config.shift_mm, config.shift_mm, device)

    upper = torch.eye(3, dtype=torch.float64, device=device).repeat(batch, 1, 1)
    upper[:, 0, 1], upper[:, 0, 2], upper[:, 1, 2] = shears[:, 0], shears[:, 1], shears[:, 2]
    upper = torch.diag_embed(scales.double()) @ upper
    linear = torch.as_tensor(rotation(angles.double().cpu().numpy()), device=device) @ upper

    vs = torch.tensor(config.voxel_mm(), dtype=torch.float64, device=device)
    linear = linear * vs[None, None, :] / vs[None, :, None]  # D^-1 L D
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64, device=device)
    shift = shifts.double() / vs
    out = torch.eye(4, dtype=torch.float64, device=device).repeat(batch, 1, 1)
    out[:, :3, :3] = linear
    out[:, :3, 3] = centre + shift - (linear @ centre[:, None])[..., 0]
    return out.float()


# ----------------------------------------------------------------------------- warps

def _control_size(n: int, spacing: float) -> int:
    return max(2, math.ceil((n - 1) / max(spacing, 1e-6)) + 1)


def _upsample(noise: torch.Tensor, shape) -> torch.Tensor:
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)


def _svf_on_grid(batch, shape, grid_shape, config, generator, device) -> torch.Tensor:
    """Random SVFs sampled on ``grid_shape`` points spanning ``shape`` (corner-aligned),
    channels first, in voxels of ``shape``."""
    vs = config.voxel_mm()
    svf = torch.zeros((batch, 3, *grid_shape), device=device)
    for fwhm in config.warp_fwhm_mm:
        size = [_control_size(n, fwhm / v) for n, v in zip(shape, vs, strict=True)]
        std = _uniform(generator, (batch,), 0.0, config.warp_std_mm, device)
        noise = _randn(generator, (batch, 3, *size), device)
        noise = noise * std[:, None, None, None, None]
        noise = noise / torch.tensor(vs, device=device)[None, :, None, None, None]  # mm -> vox
        svf = svf + _upsample(noise, grid_shape)
    return svf


def random_svf(batch: int, shape, config: SynthConfig, generator: torch.Generator, *,
               device=None) -> torch.Tensor:
    """Smooth random velocity fields ``(B, X, Y, Z, 3)`` in voxels (Perlin-like).

    For each scale in ``warp_fwhm_mm``: gaussian noise on a control grid of that spacing,
    with a std drawn from U(0, warp_std_mm) per batch element, upsampled trilinearly (a
    basis of FWHM equal to the spacing); the scales are summed.
    """
    shape = _shape3(shape)
    device = _device(generator, device)
    svf = _svf_on_grid(batch, shape, shape, config, generator, device)
    return svf.permute(0, 2, 3, 4, 1).contiguous()


def random_svf_warp(batch: int, shape, config: SynthConfig, generator: torch.Generator, *,
                    device=None, inverse: bool = False):
    """Random diffeomorphic displacements ``(B, X, Y, Z, 3)`` in voxels: the SVFs of
    :func:`random_svf` (same draws) integrated in ``warp_steps`` scaling-and-squaring
    steps.

    The fields are smooth on the scale of ``warp_fwhm_mm``, so the integration runs on a
    grid ``warp_downsample`` times coarser and the displacement is upsampled
    trilinearly (as in VoxelMorph's half-resolution integration); 1 integrates at full
    resolution. With ``inverse``, also return the inverse displacements (the negated SVFs
    integrated the same way), as a pair ``(disp, inverse)``.
    """
    shape = _shape3(shape)
    device = _device(generator, device)
    f = max(1, int(config.warp_downsample))
    low = tuple(max(2, math.ceil((n - 1) / f) + 1) if n > 2 else n for n in shape)
    svf = _svf_on_grid(batch, shape, low, config, generator, device)
    if not torch.any(svf != 0):
        zero = torch.zeros((batch, *shape, 3), device=device)
        return (zero, zero.clone()) if inverse else zero
    # voxels of shape -> voxels of the coarse grid, per axis
    step = torch.tensor([(n - 1) / max(m - 1, 1) for n, m in zip(shape, low, strict=True)],
                        device=device)
    out = []
    for sign in (1.0, -1.0)[:1 + bool(inverse)]:
        disp = integrate_svf(sign * svf.permute(0, 2, 3, 4, 1) / step,
                             config.warp_steps) * step
        if low != shape:
            disp = _upsample(disp.permute(0, 4, 1, 2, 3), shape).permute(0, 2, 3, 4, 1)
        out.append(disp.contiguous())
    return tuple(out) if inverse else out[0]


def deform_labels(labels: torch.Tensor, affine: torch.Tensor | None,
                  disp: torch.Tensor | None = None, *, fill: int = 0) -> torch.Tensor:
    """Nearest-neighbour resampling of label maps ``(B, X, Y, Z)``.

    Output voxel ``x`` takes the label at ``affine @ (x + disp(x))`` (rounded); points off
    the grid get ``fill``. ``affine`` is ``(B, 4, 4)`` or ``(B, 3, 4)`` (``None``: the
    identity), ``disp`` ``(B, X, Y, Z, 3)`` or ``None``. Labels are copied, never blended.
    """
    if labels.ndim != 4:
        raise ValueError(f"expected labels (B, X, Y, Z), got {tuple(labels.shape)}")
    b, shape = labels.shape[0], tuple(labels.shape[1:])
    coords = voxel_grid(shape, device=labels.device).expand(b, *shape, 3)
    if disp is not None:
        coords = coords + disp.to(labels.device, torch.float32)
    if affine is not None:
        m = affine.to(labels.device, torch.float32)
        coords = torch.einsum("bij,bxyzj->bxyzi", m[:, :3, :3], coords) \
            + m[:, None, None, None, :3, 3]
    return torch.stack([sample_nearest(lab, c, fill=fill) for lab, c in zip(labels, coords,
                                                                           strict=True)])


def strip_labels(labels: torch.Tensor, skull_labels, prob: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Skull on/off: with probability ``prob`` per batch element, set ``skull_labels`` to
    background (0). Returns the labels and the (B,) bool mask of stripped elements."""
    strip = _rand(generator, (labels.shape[0],), labels.device) < prob
    if not torch.any(strip):
        return labels, strip
    return remove_labels(labels, skull_labels, strip), strip


def remove_labels(labels: torch.Tensor, ids, where: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``labels`` with ``ids`` set to background; with ``where`` (B,), only in the batch
    elements of ``labels`` (B, X, Y, Z) where it is true.

    >>> remove_labels(torch.tensor([[[[0, 3, 5]]]]), (5,))
    tensor([[[[0, 3, 0]]]])
    """
    if not len(ids):
        return labels
    hit = torch.isin(labels, torch.as_tensor(tuple(ids), dtype=labels.dtype,
                                             device=labels.device))
    if where is not None:
        hit &= where[:, None, None, None]
    return torch.where(hit, torch.zeros_like(labels), labels)


# ----------------------------------------------------------------------------- intensities

def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable gaussian blur of ``image`` (B, C, X, Y, Z) with per-element, per-axis
    ``sigma`` (B, 3) in voxels (0: no blur along that axis); edges replicated."""
    b, c = image.shape[:2]
    sigma = sigma.to(image.device, torch.float32).reshape(b, 3)
    out = image.reshape(1, b * c, *image.shape[2:])
    for axis in range(3):
        s = sigma[:, axis].repeat_interleave(c)
        smax = float(s.max()) if s.numel() else 0.0
        if smax < 1e-3:
            continue
        radius = max(1, math.ceil(3.0 * smax))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
        kernel = torch.exp(-0.5 * (x[None] / s.clamp(min=1e-3)[:, None]) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        view = [b * c, 1, 1, 1, 1]
        view[2 + axis] = 2 * radius + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(view), groups=b * c)
    return out.reshape(image.shape)


def reduce_resolution(image: torch.Tensor, axis: int, thickness: float) -> torch.Tensor:
    """Simulate thick slices along ``axis`` (0-2 of X, Y, Z) of ``image`` (B, C, X, Y, Z).

    Blur along that axis with a gaussian of FWHM ``thickness`` (voxels), keep one slice
    per ``thickness`` (linear sampling), and interpolate back to the full grid. The other
    axes are untouched. ``thickness <= 1`` returns the image.
    """
    if thickness <= 1.0:
        return image
    n = image.shape[2 + axis]
    sigma = torch.zeros(image.shape[0], 3, device=image.device)
    sigma[:, axis] = thickness * FWHM_TO_SIGMA
    out = gaussian_blur(image, sigma)
    low = list(image.shape[2:])
    low[axis] = max(2, round((n - 1) / thickness) + 1)
    if low[axis] >= n:
        return out
    out = F.interpolate(out, size=tuple(low), mode="trilinear", align_corners=True)
    return F.interpolate(out, size=tuple(image.shape[2:]), mode="trilinear",
                         align_corners=True)


def random_bias_field(batch: int, shape, config: SynthConfig, generator: torch.Generator, *,
                      device=None) -> torch.Tensor:
    """Smooth positive multiplicative fields ``(B, 1, X, Y, Z)``: ``exp`` of gaussian
    noise (std U(0, bias_std)) on a control grid of spacing U(bias_fwhm_mm) millimetres,
    upsampled trilinearly. ``bias_std=0`` gives ones."""
    shape = _shape3(shape)
    device = _device(generator, device)
    vs = config.voxel_mm()
    lo, hi = config.bias_fwhm_mm
    fwhm = _uniform(generator, (batch,), lo, hi, device).tolist()
    std = _uniform(generator, (batch,), 0.0, config.bias_std, device)
    out = []
    for b in range(batch):
        size = [_control_size(n, fwhm[b] / v) for n, v in zip(shape, vs, strict=True)]
        noise = _randn(generator, (1, 1, *size), device) * std[b]
        out.append(_upsample(noise, shape))
    return torch.exp(torch.cat(out)) if out else torch.ones((0, 1, *shape), device=device)


def _minmax(image: torch.Tensor) -> torch.Tensor:
    flat = image.reshape(image.shape[0], -1)
    lo = flat.min(dim=1).values.reshape(-1, *[1] * (image.ndim - 1))
    hi = flat.max(dim=1).values.reshape(-1, *[1] * (image.ndim - 1))
    return (image - lo) / (hi - lo).clamp(min=1e-12)


def labels_to_image(labels: torch.Tensor, config: SynthConfig,
                    generator: torch.Generator, num_values: int | None = None
                    ) -> torch.Tensor:
    """Synthesise images ``(B, 1, X, Y, Z)`` in [0, 1] from label maps ``(B, X, Y, Z)``.

    Steps, each with its own random parameters per batch element: per-label intensity
    ``N(mean, std)`` with mean ~ U(mean_min, mean_max) and std ~ U(noise_min, noise_max)
    (label 0 black with probability ``zero_background_prob``); gaussian blur of sigma
    U(0, blur_max_mm) per axis; thick slices along a random axis with probability
    ``res_prob``; bias field; min-max normalisation; gamma; zeroing a random end slab
    with probability ``crop_prob``.

    Intensities are drawn for every label value below ``num_values`` (default: the
    largest present, plus one), present or not, so the same generator state gives each
    label the same intensity in maps that differ in which labels they hold (a head
    stripped in one of them).
    """
    if labels.ndim != 4:
        raise ValueError(f"expected labels (B, X, Y, Z), got {tuple(labels.shape)}")
    dev, (b, *shape) = labels.device, labels.shape
    g = generator
    vs = config.voxel_mm()
    top = int(labels.max())
    n_lab = top + 1 if num_values is None else int(num_values)
    if top >= n_lab:
        raise ValueError(f"label {top} is not below num_values {n_lab}")
    # all draws, in a fixed order, whether used or not
    means = _uniform(g, (b, n_lab), config.mean_min, config.mean_max, dev)
    stds = _uniform(g, (b, n_lab), config.noise_min, config.noise_max, dev)
    zero_bg = _rand(g, (b,), dev) < config.zero_background_prob
    noise = _randn(g, (b, 1, *shape), dev)
    blur = _rand(g, (b, 3), dev) * config.blur_max_mm / torch.tensor(vs, device=dev)
    res_on = (_rand(g, (b,), dev) < config.res_prob).tolist()
    res_axis = _randint(g, 3, (b,), dev).tolist()
    res_mm = _uniform(g, (b,), config.res_min_mm, config.res_max_mm, dev).tolist()
    bias = random_bias_field(b, shape, config, g, device=dev)
    gamma = torch.exp(_randn(g, (b,), dev) * config.gamma_std)
    gamma = gamma.clamp(config.gamma_min, config.gamma_max)
    crop_on = (_rand(g, (b,), dev) < config.crop_prob).tolist()
    crop_axis = _randint(g, 3, (b,), dev).tolist()
    crop_end = (_rand(g, (b,), dev) < 0.5).tolist()
    crop_frac = _rand(g, (b,), dev).mul(config.crop_max).tolist()

    keep = (~zero_bg).float()
    means[:, 0] = means[:, 0] * keep
    stds[:, 0] = stds[:, 0] * keep
    index = labels.reshape(b, -1)
    image = torch.gather(means, 1, index) + torch.gather(stds, 1, index) * noise.reshape(b, -1)
    image = image.reshape(b, 1, *shape)
    image = gaussian_blur(image, blur)
    if any(res_on):
        parts = []
        for i in range(b):
            part = image[i:i + 1]
            if res_on[i]:
                part = reduce_resolution(part, res_axis[i], res_mm[i] / vs[res_axis[i]])
            parts.append(part)
        image = torch.cat(parts)
    if config.bias_std > 0:
        image = image * bias
    image = _minmax(image)
    image = image.clamp(0.0, 1.0) ** gamma.reshape(b, 1, 1, 1, 1)
    for i in range(b):
        if crop_on[i]:
            n = shape[crop_axis[i]]
            width = int(crop_frac[i] * n)
            if width:
                index = [i, slice(None), slice(None), slice(None), slice(None)]
                index[2 + crop_axis[i]] = slice(n - width, n) if crop_end[i] else slice(0, width)
                image[tuple(index)] = 0.0
    return image


# ----------------------------------------------------------------------------- pairs

def _flip(x: torch.Tensor, flips: list[list[bool]], first: int) -> torch.Tensor:
    """Flip batch element ``i`` of ``x`` along the spatial axes ``flips[i]``; spatial axes
    start at dimension ``first``."""
    parts = []
    for i, f in enumerate(flips):
        dims = [first - 1 + a for a in range(3) if f[a]]  # the batch dim is dropped
        parts.append(torch.flip(x[i], dims) if dims else x[i])
    return torch.stack(parts) if parts else x


def sample_pair(labels: torch.Tensor, config: SynthConfig, generator: torch.Generator,
                same_contrast: bool = False, labels_2: torch.Tensor | None = None,
                inverse: bool = False) -> dict[str, torch.Tensor]:
    """A training pair from label maps ``(B, X, Y, Z)`` (one anatomy per batch element).

    Each image gets its own random affine and SVF warp of the same label map (the
    deformed map with ``skull_labels`` set to background with probability
    ``skull_prob``, independently per image) and its own contrast. Finally the whole pair
    is flipped along random axes (each with ``flip_prob``), consistently for images and
    labels. With ``labels_2`` (another anatomy on the same grid, e.g. a second subject
    normalised to the same affine reference) the second image is made from it instead.
    With ``inverse``, ``inv_disp_1`` and ``inv_disp_2`` hold the inverse warps.

    Returns ``image_1``, ``image_2`` ((B, 1, X, Y, Z) float in [0, 1]), ``labels_1``,
    ``labels_2`` ((B, X, Y, Z) long, the maps the images were made from), ``affine_1``,
    ``affine_2`` ((B, 4, 4)), ``disp_1``, ``disp_2`` ((B, X, Y, Z, 3) voxels) - the
    transforms act before the flips, mapping output voxel ``x`` to the source label
    voxel ``affine @ (x + disp(x))`` - and ``flips`` ((B, 3) bool).

    With ``same_contrast`` the second image repeats the first one's intensity draws
    (label means, noise, bias, blur, gamma, resolution, crop), an easier pair for the
    start of training.
    """
    if labels.ndim != 4:
        raise ValueError(f"expected labels (B, X, Y, Z), got {tuple(labels.shape)}")
    labels = labels.long()
    dev, b, shape = labels.device, labels.shape[0], tuple(labels.shape[1:])
    out: dict[str, torch.Tensor] = {}
    contrast_state = generator.get_state()  # set again before the first image's contrast
    if labels_2 is not None and tuple(labels_2.shape) != tuple(labels.shape):
        raise ValueError(f"labels_2 {tuple(labels_2.shape)} differ in shape from labels "
                         f"{tuple(labels.shape)}")
    # one intensity table for both images: their maps may hold different labels
    values = 1 + max(int(labels.max()), -1 if labels_2 is None else int(labels_2.max()))
    for k in (1, 2):
        affine = random_affine(b, shape, config, generator, device=dev)
        disp = random_svf_warp(b, shape, config, generator, device=dev, inverse=inverse)
        if inverse:
            disp, out[f"inv_disp_{k}"] = disp
        source = labels if k == 1 or labels_2 is None else labels_2.long().to(dev)
        moved = deform_labels(source, affine, disp)
        moved, _ = strip_labels(moved, config.skull_labels, config.skull_prob, generator)
        if same_contrast and k == 2:
            now = generator.get_state()
            generator.set_state(contrast_state)
            out["image_2"] = labels_to_image(moved, config, generator, values)
            generator.set_state(now)
        else:
            contrast_state = generator.get_state()
            out[f"image_{k}"] = labels_to_image(moved, config, generator, values)
        out[f"labels_{k}"] = moved
        out[f"affine_{k}"] = affine
        out[f"disp_{k}"] = disp
    flips = _rand(generator, (b, 3), dev) < config.flip_prob
    if torch.any(flips):
        fl = flips.tolist()
        for k in (1, 2):
            out[f"image_{k}"] = _flip(out[f"image_{k}"], fl, 2)
            out[f"labels_{k}"] = _flip(out[f"labels_{k}"], fl, 1)
    out["flips"] = flips
    return out
