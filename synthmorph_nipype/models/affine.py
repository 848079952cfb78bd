"""SynthMorph's affine feature detector (``VxmAffineFeatureDetector``), affine and rigid.

A convolutional encoder turns each image into ``num_feat`` feature maps; each map gives a
barycentre per image, and a weighted least-squares fit between the two sets of
barycentres gives the affine transform. The fit is symmetrised and, for rigid models,
reduced to a rotation and a translation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layers import INPUT_FEATURES, conv3, input_features, leaky


@dataclass(frozen=True)
class AffineConfig:
    """Widths of the feature detector (the official defaults are the full model)."""

    num_feat: int = 64
    enc_nf: tuple[int, ...] = (256,) * 4
    dec_nf: tuple[int, ...] = ()
    add_nf: tuple[int, ...] = (256,) * 4
    num_chan: int = 1
    rigid: bool = False
    half_res: bool = True
    # average-pool the (half-resolution) input by this factor before the encoder: the
    # embedded detector was trained on a 4 mm grid and sees the engine's 2 mm grid pooled
    prepool: int = 1
    # "mind": the detector sees each image's MIND descriptors (models.layers.INPUT_FEATURES)
    input_features: str = ""

    def __post_init__(self):
        input_features(self.input_features)  # known kind, or ValueError

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> AffineConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class AffineOutput:
    """Detector results for one image pair, in centred network-voxel coordinates."""

    feat_1: torch.Tensor
    feat_2: torch.Tensor
    cen_1: torch.Tensor
    cen_2: torch.Tensor
    weights: torch.Tensor
    matrix: torch.Tensor  # (N, 4, 4): maps centred image-2 coordinates to image-1 coordinates
    extra: dict = field(default_factory=dict)


class AffineDetector(nn.Module):
    """Feature detector: encoder (conv, LeakyReLU, max-pool per level), optional decoder,
    additional convolutions, and a final convolution with ReLU to ``num_feat`` maps."""

    def __init__(self, config: AffineConfig | None = None):
        super().__init__()
        self.config = config = config or AffineConfig()
        cin = config.num_chan * INPUT_FEATURES[config.input_features]
        self.enc = nn.ModuleList()
        skips = []
        for n in config.enc_nf:
            self.enc.append(conv3(cin, n))
            skips.append(n)
            cin = n
        self.dec = nn.ModuleList()
        for n in config.dec_nf:
            self.dec.append(conv3(cin, n))
            cin = n + skips.pop()
        self.add = nn.ModuleList()
        for n in config.add_nf:
            self.add.append(conv3(cin, n))
            cin = n
        self.out = conv3(cin, config.num_feat)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(N, num_feat, ...)`` of a channels-first batch ``x``."""
        if self.config.prepool > 1:
            x = F.avg_pool3d(x, self.config.prepool)
        seen = input_features(self.config.input_features)
        if seen is not None:
            x = seen(x)
        skips = []
        for conv in self.enc:
            x = leaky(conv(x))
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for conv in self.dec:
            x = leaky(conv(x))
            x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skips.pop()], 1)
        for conv in self.add:
            x = leaky(conv(x))
        return F.relu(self.out(x))

    def forward(self, inp_1: torch.Tensor, inp_2: torch.Tensor,
                half_res: bool | None = None) -> AffineOutput:
        """Register ``inp_1`` (moving) and ``inp_2`` (fixed), channels-first ``(N, C, *s)``.

        With ``half_res`` (default: the config's) the inputs are subsampled
        ``x[::2, ::2, ::2]`` first. The returned ``matrix`` maps centred fixed-network
        coordinates to moving ones, in voxels of the given input size (a ``prepool``
        changes nothing there: barycentres are in units of the grid extent, and pooled
        voxel ``k`` is centred on input voxel ``p k + (p - 1) / 2``).
        """
        shape = torch.tensor(inp_1.shape[2:], dtype=torch.float64)
        if self.config.half_res if half_res is None else half_res:
            inp_1, inp_2 = inp_1[:, :, ::2, ::2, ::2], inp_2[:, :, ::2, ::2, ::2]
        feat_1, feat_2 = self.features(inp_1), self.features(inp_2)
        # the fit runs in float64 even when the features come from mixed precision
        with torch.autocast(feat_1.device.type, enabled=False):
            f1, f2 = feat_1.double(), feat_2.double()
            cen_1 = barycenters(f1) * shape.to(f1.device)
            cen_2 = barycenters(f2) * shape.to(f2.device)
            weights = channel_weights(f1, f2)
            matrix = symmetric_affine(cen_1, cen_2, weights)
            if self.config.rigid:
                matrix = rigid_part(matrix)
        return AffineOutput(feat_1, feat_2, cen_1, cen_2, weights, matrix)


def barycenters(feat: torch.Tensor) -> torch.Tensor:
    """Barycentre of each map ``(N, C, *s)`` -> ``(N, C, 3)``, in centred units of the grid
    extent (``(i - (s - 1) / 2) / s``); 0 for a map that sums to 0."""
    shape = feat.shape[2:]
    axes = [(torch.arange(n, dtype=feat.dtype, device=feat.device) - (n - 1) / 2) / n
            for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*s, 3)
    flat = feat.flatten(2)
    total = flat.sum(-1, keepdim=True)
    cen = flat @ grid.reshape(-1, 3)
    return torch.where(total != 0, cen / torch.where(total != 0, total, 1), 0)


def channel_weights(feat_1: torch.Tensor, feat_2: torch.Tensor) -> torch.Tensor:
    """``(p1 / sum p1) * (p2 / sum p2)`` with ``p`` the mass of each map: ``(N, C)``."""
    p1, p2 = feat_1.flatten(2).sum(-1), feat_2.flatten(2).sum(-1)
    return p1 / p1.sum(-1, keepdim=True) * (p2 / p2.sum(-1, keepdim=True))


def fit_affine(src: torch.Tensor, tgt: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares affine ``(N, 4, 4)`` mapping ``tgt`` points to ``src`` points."""
    ones = torch.ones_like(tgt[..., :1])
    x = torch.cat([tgt, ones], -1)  # (N, P, 4)
    xtw = x.transpose(1, 2) * weights[:, None, :]
    beta = torch.linalg.solve(xtw @ x, xtw @ src)  # (N, 4, 3)
    bottom = torch.zeros_like(beta[:, :1, :]).new_tensor([0, 0, 0, 1]).expand(len(beta), 1, 4)
    return torch.cat([beta.transpose(1, 2), bottom], 1)


def symmetric_affine(cen_1: torch.Tensor, cen_2: torch.Tensor, weights: torch.Tensor):
    """Average of the fit 2->1 and the inverse of the fit 1->2, as the official model."""
    aff_1 = fit_affine(cen_1, cen_2, weights)
    aff_2 = fit_affine(cen_2, cen_1, weights)
    return 0.5 * (torch.linalg.inv(aff_2) + aff_1)


def rigid_part(matrix: torch.Tensor) -> torch.Tensor:
    """Keep the rotation (QR factor with a positive triangle diagonal) and the translation."""
    q, r = torch.linalg.qr(matrix[:, :3, :3])
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    out = matrix.clone()
    out[:, :3, :3] = q
    return out
