"""Convolution layers whose weights may come from a hypernetwork, and what the networks
may see of their input images."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.similarity import mind

#: what a network may see of each image channel, and how many channels that makes: the
#: intensities (SynthMorph) or their six MIND descriptors (on the network's own grid)
INPUT_FEATURES = {"": 1, "mind": 6}


def mind_channels(x: torch.Tensor) -> torch.Tensor:
    """Each channel of ``x`` (B, C, X, Y, Z) replaced by its six MIND descriptors
    (B, 6 C, X, Y, Z), channel by channel.

    >>> x = torch.rand(2, 2, 6, 6, 6)
    >>> y = mind_channels(x)
    >>> tuple(y.shape), bool(torch.allclose(y, mind_channels(1 - x), atol=1e-5))
    ((2, 12, 6, 6, 6), True)
    """
    b, c = x.shape[:2]
    return mind(x.reshape(b * c, 1, *x.shape[2:])).reshape(b, 6 * c, *x.shape[2:])


def input_features(kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from input images to what a network's first convolution sees
    (:data:`INPUT_FEATURES`; None: the intensities themselves)."""
    if kind not in INPUT_FEATURES:
        raise ValueError(f"unknown input features {kind!r}, choose from "
                         f"{', '.join(repr(k) for k in INPUT_FEATURES)}")
    return mind_channels if kind == "mind" else None


def conv3(cin: int, cout: int) -> nn.Conv3d:
    """3x3x3 convolution with 'same' zero padding, as Keras ``Conv3D(padding='same')``."""
    return nn.Conv3d(cin, cout, kernel_size=3, padding=1)


def hyper_conv_weights(h: torch.Tensor, kernel_w: torch.Tensor, kernel_b: torch.Tensor,
                       bias_w: torch.Tensor, bias_b: torch.Tensor, cin: int, cout: int):
    """Convolution weights a hyper-layer predicts for the hyper-feature ``h``.

    As neurite's ``HyperConvFromDense``: ``kernel = reshape(h @ K + k, (3, 3, 3, cin, cout))``
    (C order, channels last) and ``bias = h @ B + b``, with ``K``/``B`` given in
    ``nn.Linear`` layout (``out x in``). Returns the torch kernel ``(cout, cin, 3, 3, 3)``
    and bias ``(cout,)``.
    """
    h = h.reshape(1, -1)
    kernel = F.linear(h, kernel_w, kernel_b).reshape(3, 3, 3, cin, cout)
    return kernel.permute(4, 3, 0, 1, 2).contiguous(), F.linear(h, bias_w, bias_b)[0]


class HyperConv3d(nn.Module):
    """3x3x3 convolution whose kernel and bias are linear functions of a hyper-feature ``h``
    (see :func:`hyper_conv_weights`)."""

    def __init__(self, hyp_features: int, cin: int, cout: int):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.hyperkernel = nn.Linear(hyp_features, 27 * cin * cout)
        self.hyperbias = nn.Linear(hyp_features, cout)

    def kernel(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel ``(cout, cin, 3, 3, 3)`` and bias ``(cout,)`` for one hyper-feature ``h``."""
        return hyper_conv_weights(h, self.hyperkernel.weight, self.hyperkernel.bias,
                                  self.hyperbias.weight, self.hyperbias.bias,
                                  self.cin, self.cout)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        weight, bias = self.kernel(h)
        return F.conv3d(x, weight, bias, padding=1)


def leaky(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU with the slope SynthMorph uses everywhere (0.2)."""
    return F.leaky_relu(x, 0.2)
