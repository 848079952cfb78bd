"""Argument types and the one-line-error parser that ``synthmorph`` and
``synthmorph-bids`` share."""

from __future__ import annotations

import argparse

from ..vocabulary import EXTENTS

#: most integration steps: 2**16 halvings leave a velocity far below a voxel's precision
MAX_STEPS = 16


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are a single line (exit code 2)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def regularization(text: str) -> float:
    """A regularisation weight in the open interval (0, 1).

    >>> regularization("0.3")
    0.3
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"regularization weight must lie in (0, 1), got {text}")
    return value


def extent(text: str) -> int:
    """A network extent (:data:`~synthmorph_nipype.vocabulary.EXTENTS`)."""
    if text not in {str(e) for e in EXTENTS}:
        raise argparse.ArgumentTypeError(
            f"extent must be {' or '.join(str(e) for e in EXTENTS)}, got {text}")
    return int(text)


def non_negative(text: str) -> int:
    """A whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def positive(text: str) -> int:
    """A whole number >= 1.

    >>> positive("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a whole number >= 1, got '0'
    """
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def integration_steps(text: str) -> int:
    """Scaling-and-squaring steps, 0 to :data:`MAX_STEPS`."""
    value = non_negative(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"integration steps must lie in 0..{MAX_STEPS}, "
                                         f"got {text}")
    return value


def memory_gb(text: str) -> float:
    """Memory in GB, as ``8``, ``8G``, ``8000M`` or ``1T``.

    >>> memory_gb("512M"), memory_gb("16G"), memory_gb("2")
    (0.5, 16.0, 2.0)
    """
    t = text.strip().lower().rstrip("b")
    scale = {"g": 1.0, "m": 1 / 1024, "t": 1024.0}.get(t[-1:], None)
    try:
        return float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"memory like 8, 8G or 8000M, got {text!r}") from None
