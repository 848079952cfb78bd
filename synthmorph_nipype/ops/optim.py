"""Adam for the test-time refinement: a few tensors, a few hundred steps.

``torch.optim.Adam`` would do the same arithmetic, but building the first
``torch.optim`` optimiser of a process imports ``torch._dynamo`` (about 1.2 s on this
project's CPUs), a fixed cost paid by every ``synthmorph register`` run for an optimiser
of two to four tensors. Training keeps ``torch.optim.Adam`` (its state is checkpointed).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Adam:
    """Adam (Kingma & Ba 2015) without weight decay, on the tensors ``params``.

    ``lr`` may be changed between steps (a schedule). Parameters whose ``grad`` is None
    are skipped. Same update as ``torch.optim.Adam`` with its defaults.

    >>> x = torch.tensor([3.0, -2.0], requires_grad=True)
    >>> opt = Adam([x], lr=0.1)
    >>> for _ in range(200):
    ...     opt.zero_grad()
    ...     (x ** 2).sum().backward()
    ...     opt.step()
    >>> bool(x.abs().max() < 0.05)
    True
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr = float(lr)
        self.beta_1, self.beta_2 = betas
        self.eps = eps
        self._steps = [0] * len(self.params)  # per tensor, as a tensor may skip a step
        self._mean = [torch.zeros_like(p) for p in self.params]
        self._square = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        """Drop the gradients (as ``set_to_none=True``)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' ``grad``: moment estimates, bias-corrected."""
        for i, (p, mean, square) in enumerate(zip(self.params, self._mean, self._square,
                                                  strict=True)):
            if p.grad is None:
                continue
            self._steps[i] += 1
            rate = self.lr / (1 - self.beta_1 ** self._steps[i])
            root = (1 - self.beta_2 ** self._steps[i]) ** 0.5
            mean.lerp_(p.grad, 1 - self.beta_1)
            square.mul_(self.beta_2).addcmul_(p.grad, p.grad, value=1 - self.beta_2)
            p.addcdiv_(mean, (square.sqrt() / root).add_(self.eps), value=-rate)
