"""SynthMorph registration in PyTorch for Nipype pipelines and BIDS datasets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("synthmorph-nipype")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
