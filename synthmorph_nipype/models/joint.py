"""SynthMorph's deformable network (the U-Net inside ``HyperVxmJoint``).

The U-Net predicts a stationary velocity field from two half-resolution images. Its
convolution weights come from a hypernetwork of the regularisation weight ``lambda``
(:class:`HyperUNet`); for one fixed ``lambda`` they reduce to ordinary convolutions
(:class:`UNet`, made by :meth:`HyperUNet.specialize`), so inference never runs the
hypernetwork more than once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import INPUT_FEATURES, HyperConv3d, conv3, input_features, leaky


@dataclass(frozen=True)
class UNetConfig:
    """Widths of the deformable network (the official defaults are the full model)."""

    hyp_units: tuple[int, ...] = (32,) * 4
    enc_nf: tuple[int, ...] = (256,) * 4
    dec_nf: tuple[int, ...] = (256,) * 4
    add_nf: tuple[int, ...] = (256,) * 4
    num_chan: int = 1
    # run on the input average-pooled by this factor and upsample the velocity field back
    # (in input voxels): a U-Net trained on a 4 mm grid serves the engine's 2 mm grid
    prepool: int = 1
    # spatially varying regularisation (Chen et al.): a fourth output channel, the logit
    # of a voxel-wise regularisation weight (see :func:`split_lambda`)
    lambda_head: bool = False
    # "mind": the U-Net sees each image's MIND descriptors instead of its intensities (a
    # contrast change that keeps edges changes nothing it sees; the official models: "")
    input_features: str = ""

    def __post_init__(self):
        if len(self.enc_nf) != len(self.dec_nf):
            raise ValueError("the encoder and decoder need the same number of levels")
        input_features(self.input_features)  # known kind, or ValueError

    def layer_channels(self) -> list[tuple[int, int]]:
        """``(cin, cout)`` of every convolution, in the official order."""
        cin = 2 * self.num_chan * INPUT_FEATURES[self.input_features]
        chans, skips = [], []
        for n in self.enc_nf:
            chans.append((cin, n))
            skips.append(n)
            cin = n
        for n in self.dec_nf:
            chans.append((cin, n))
            cin = n + skips.pop()
        for n in (*self.add_nf, 4 if self.lambda_head else 3):
            chans.append((cin, n))
            cin = n
        return chans

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def unet_forward(x: torch.Tensor, convs: Sequence[Callable], levels: int,
                 prepool: int = 1, features: Callable | None = None) -> torch.Tensor:
    """The U-Net topology: ``levels`` x (conv, LeakyReLU, max-pool), ``levels`` x (conv,
    LeakyReLU, nearest upsampling, concat with the skip), extra convs with LeakyReLU and a
    final conv without activation. The raw input is never a skip connection.

    With ``prepool`` > 1 the input is average-pooled by that factor first and the output
    field upsampled back (trilinear, pooled voxel ``k`` centred on input voxel
    ``p k + (p - 1) / 2``) and scaled to input voxels. ``features`` (optional) maps the
    (pooled) input to what the first convolution sees."""
    if prepool > 1:
        out = unet_forward(F.avg_pool3d(x, prepool), convs, levels, features=features)
        up = F.interpolate(out, scale_factor=prepool, mode="trilinear", align_corners=False)
        scale = torch.ones(up.shape[1], dtype=up.dtype, device=up.device)
        scale[:3] = prepool  # velocities to input voxels; a lambda logit stays as it is
        return up * scale.view(1, -1, 1, 1, 1)
    if features is not None:
        x = features(x)
    skips = []
    for conv in convs[:levels]:
        x = leaky(conv(x))
        skips.append(x)
        x = F.max_pool3d(x, 2)
    for conv in convs[levels:2 * levels]:
        x = leaky(conv(x))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = torch.cat([x, skips.pop()], 1)
    for conv in convs[2 * levels:-1]:
        x = leaky(conv(x))
    return convs[-1](x)


def split_lambda(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The velocity field ``(B, 3, ...)`` of a U-Net output and, when it has a lambda head,
    the voxel-wise regularisation weight ``(B, 1, ...)``: sigmoid of the fourth channel,
    kept in ``[1e-6, 1]`` so that its logarithm (the prior) stays finite.

    >>> svf, lam = split_lambda(torch.zeros(1, 4, 2, 2, 2))
    >>> tuple(svf.shape), float(lam.mean())
    ((1, 3, 2, 2, 2), 0.5)
    """
    if out.shape[1] == 3:
        return out, None
    return out[:, :3], torch.sigmoid(out[:, 3:4]).clamp(1e-6, 1.0)


def lambda_head(conv: nn.Conv3d) -> Callable[[torch.Tensor], torch.Tensor]:
    """The last convolution of a U-Net with a lambda head: velocity channels as usual, the
    lambda logit from the features cut out of the autograd graph. The map's prior and
    penalty then train the head's own weights and never the features the field is made
    from: otherwise the prior, which keeps pulling lambda towards 1 (a sigmoid never gets
    there), inflates those features step after step under Adam until the field explodes."""
    def head(x: torch.Tensor) -> torch.Tensor:
        velocity = F.conv3d(x, conv.weight[:3], conv.bias[:3], padding=1)
        logit = F.conv3d(x.detach(), conv.weight[3:], conv.bias[3:], padding=1)
        return torch.cat([velocity, logit], 1)
    return head


class UNet(nn.Module):
    """Deformable U-Net with ordinary convolutions (one fixed regularisation weight), or
    with a lambda head (``config.lambda_head``: a fourth output channel, see
    :func:`split_lambda` and :func:`lambda_head`)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        self.convs = nn.ModuleList(conv3(i, o) for i, o in config.layer_channels())

    def forward(self, x: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """The U-Net's output on ``x``; ``pooled``: ``x`` is already average-pooled by
        ``config.prepool`` and the output stays on that grid, in its voxels."""
        convs: list[Callable] = list(self.convs)
        if self.config.lambda_head:
            convs[-1] = lambda_head(self.convs[-1])
        return unet_forward(x, convs, len(self.config.enc_nf),
                            1 if pooled else self.config.prepool,
                            input_features(self.config.input_features))


class HyperUNet(nn.Module):
    """Deformable U-Net whose convolutions a hypernetwork predicts from ``lambda``."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        units, prev = [], 1
        for n in config.hyp_units:
            units.append(nn.Linear(prev, n))
            prev = n
        self.hyper = nn.ModuleList(units)
        self.convs = nn.ModuleList(HyperConv3d(prev, i, o) for i, o in config.layer_channels())

    def hyper_features(self, lam: float | torch.Tensor) -> torch.Tensor:
        """Hypernetwork output ``h(lambda)``: dense layers, each with ReLU."""
        ref = self.hyper[0].weight
        h = torch.as_tensor(lam, dtype=ref.dtype, device=ref.device).reshape(1, 1)
        for dense in self.hyper:
            h = F.relu(dense(h))
        return h

    def forward(self, x: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        h = self.hyper_features(lam)
        convs = [lambda t, c=c: c(t, h) for c in self.convs]
        return unet_forward(x, convs, len(self.config.enc_nf), self.config.prepool,
                            input_features(self.config.input_features))

    @torch.no_grad()
    def specialize(self, lam: float) -> UNet:
        """An ordinary :class:`UNet` with the convolutions predicted for ``lam``."""
        h = self.hyper_features(lam)
        unet = UNet(self.config).to(self.hyper[0].weight.device)
        for conv, hyper in zip(unet.convs, self.convs, strict=True):
            weight, bias = hyper.kernel(h)
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return unet
