"""Convolution layers whose weights may come from a hypernetwork."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3(cin: int, cout: int) -> nn.Conv3d:
    """3x3x3 convolution with 'same' zero padding, as Keras ``Conv3D(padding='same')``."""
    return nn.Conv3d(cin, cout, kernel_size=3, padding=1)


class HyperConv3d(nn.Module):
    """3x3x3 convolution whose kernel and bias are linear functions of a hyper-feature ``h``.

    As neurite's ``HyperConvFromDense``: ``kernel = reshape(h @ K + k, (3, 3, 3, cin, cout))``
    (C order, channels last) and ``bias = h @ B + b``. :meth:`kernel` returns the torch
    layout ``(cout, cin, 3, 3, 3)``.
    """

    def __init__(self, hyp_features: int, cin: int, cout: int):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.hyperkernel = nn.Linear(hyp_features, 27 * cin * cout)
        self.hyperbias = nn.Linear(hyp_features, cout)

    def kernel(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel ``(cout, cin, 3, 3, 3)`` and bias ``(cout,)`` for one hyper-feature ``h``."""
        k = self.hyperkernel(h.reshape(1, -1)).reshape(3, 3, 3, self.cin, self.cout)
        return k.permute(4, 3, 0, 1, 2).contiguous(), self.hyperbias(h.reshape(1, -1))[0]

    def to_conv(self, h: torch.Tensor) -> nn.Conv3d:
        """An ordinary convolution with the weights predicted for ``h``."""
        conv = conv3(self.cin, self.cout)
        weight, bias = self.kernel(h)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        weight, bias = self.kernel(h)
        return F.conv3d(x, weight, bias, padding=1)


def leaky(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU with the slope SynthMorph uses everywhere (0.2)."""
    return F.leaky_relu(x, 0.2)
