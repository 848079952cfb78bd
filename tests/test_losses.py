"""Training objectives against independent NumPy computations."""

from __future__ import annotations

import numpy as np
import torch

from synthmorph_nipype.ops.regularity import grad_l2
from synthmorph_nipype.training.losses import (
    hyper_loss,
    label_mse,
    one_hot,
    soft_dice,
)


def random_labels(seed: int, shape=(2, 10, 11, 12), n=4) -> torch.Tensor:
    return torch.randint(0, n, shape, generator=torch.Generator().manual_seed(seed))


def test_soft_dice_equals_hard_dice_on_one_hot_maps():
    a, b = random_labels(0), random_labels(1)
    ours = float(soft_dice(one_hot(a, 4), one_hot(b, 4)))
    an, bn = a.numpy(), b.numpy()
    want = np.mean([[2 * ((an[i] == k) & (bn[i] == k)).sum()
                     / ((an[i] == k).sum() + (bn[i] == k).sum()) for k in range(1, 4)]
                    for i in range(2)])
    assert abs(ours - want) < 1e-5
    assert abs(float(soft_dice(one_hot(a, 4), one_hot(a, 4))) - 1) < 1e-6


def test_label_mse_counts_disagreeing_voxels():
    a, b = random_labels(2), random_labels(3)
    disagree = (a != b).float().mean()
    # each disagreeing voxel contributes 1 + 1 over the one-hot channels
    assert abs(float(label_mse(one_hot(a, 4), one_hot(b, 4))) - 2 * float(disagree)) < 1e-6


def test_grad_l2_matches_numpy():
    disp = torch.randn(2, 3, 6, 7, 8, generator=torch.Generator().manual_seed(4))
    d = disp.numpy()
    want = np.mean([np.mean(np.diff(d, axis=a) ** 2) for a in (2, 3, 4)])
    assert abs(float(grad_l2(disp)) - want) < 1e-6


def test_hyper_loss_weights_and_gradients():
    a, b = one_hot(random_labels(5), 4), one_hot(random_labels(6), 4)
    disp = torch.randn(2, 3, 10, 11, 12, requires_grad=True)
    sim = ((a - b) ** 2).sum(1).flatten(1).mean(1)
    smooth = torch.stack([grad_l2(disp[i:i + 1]) for i in range(2)])
    lam = torch.tensor([0.0, 1.0])
    loss = hyper_loss(a, b, disp, lam)
    assert torch.allclose(loss, 0.5 * (sim[0] + smooth[1]))
    loss.backward()
    assert disp.grad[0].abs().sum() == 0 and disp.grad[1].abs().sum() > 0
