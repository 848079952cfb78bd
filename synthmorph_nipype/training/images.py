"""A user's own images as training data (VoxelMorph-style, no labels).

Each image is conformed once to the network space the engine uses (1 mm, LIA, ``extent``
voxels, centred on the image); a training pair is two of them brought into their affine
mid-space by a feature detector (or just subsampled) at half resolution, exactly what
the deformable network sees at registration time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..engine.conform import conform
from ..engine.network import deformable_inputs
from ..engine.space import net_to_ras
from ..errors import InputError
from ..io.images import image_data, load_image
from ..models.affine import AffineDetector
from ..transforms.base import ImageGrid

SUFFIXES = (".nii", ".nii.gz", ".mgz")


def image_files(spec: str | Path) -> list[Path]:
    """The images under ``spec``: a BIDS dataset (its anatomical images, via pybids), a
    folder (every NIfTI/MGZ below it), or a text file listing paths."""
    root = Path(spec)
    if root.is_file() and root.suffix in (".txt", ".lst"):
        files = [Path(line.strip()) for line in root.read_text().splitlines() if line.strip()]
    elif (root / "dataset_description.json").is_file():
        from bids import BIDSLayout

        layout = BIDSLayout(str(root), validate=False)
        files = [Path(f) for f in layout.get(datatype="anat", return_type="file",
                                              suffix=["T1w", "T2w", "FLAIR", "PDw"],
                                              extension=[".nii", ".nii.gz"])]
    elif root.is_dir():
        files = [p for p in root.rglob("*") if p.name.endswith(SUFFIXES)
                 and "derivatives" not in p.relative_to(root).parts]
    else:
        raise InputError(f"{spec}: not a folder, BIDS dataset or list of images")
    files = sorted(files)
    if len(files) < 2:
        raise InputError(f"{spec}: training on images needs at least 2, found {len(files)}")
    return files


class ImagePairs:
    """Images conformed to the network space; :meth:`pair` draws two of them."""

    def __init__(self, files: list[Path], extent: int = 192, device="cpu"):
        self.files = list(files)
        self.extent = extent
        self.device = torch.device(device)
        self.images = [self._conform(f) for f in self.files]

    def _conform(self, path: Path) -> torch.Tensor:
        img = load_image(str(path))
        grid = ImageGrid.from_image(img)
        net2ras = net_to_ras(grid.center_ras, self.extent)
        return conform(image_data(img), np.linalg.inv(img.affine) @ net2ras, self.extent,
                       self.device)

    def pair(self, generator: torch.Generator, detector: AffineDetector | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two different images, ``(1, 1, e/2, e/2, e/2)`` each, in their mid-space."""
        n = len(self.images)
        i = int(torch.randint(0, n, (1,), generator=generator))
        j = (i + 1 + int(torch.randint(0, n - 1, (1,), generator=generator))) % n
        def_1, def_2, *_ = deformable_inputs(self.images[i], self.images[j], detector)
        return def_1[None, None].contiguous(), def_2[None, None].contiguous()


__all__ = ["ImagePairs", "image_files"]
