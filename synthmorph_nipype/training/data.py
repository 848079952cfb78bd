"""Label maps to train on, placed on the training grid.

Training runs in the half-resolution network space of ``mri_synthmorph``: the LIA grid of
2 mm voxels that the networks see inside a 192 mm (96 voxels) or 256 mm extent. A
:class:`LabelSource` draws label maps there: whole-head label maps of real subjects when
the user gives them (``--label-maps``, affinely normalised, see
:mod:`..synthesis.label_maps`), else brains derived from the template nilearn ships (with
or without a synthetic head), and random Perlin shapes, as SynthMorph's *sm-brains* and
*sm-shapes* data. Pairs of real subjects are drawn from one subject (warped twice) or from
two different subjects (inter-subject, as SynthMorph).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine.space import net_to_ras
from ..ops.grid import affine_points
from ..ops.sampling import sample_nearest
from ..synthesis.generator import remove_labels
from ..synthesis.label_maps import SubjectLabels, align, loss_labels
from ..synthesis.labels import random_shapes, template_labels
from ..transforms.base import ImageGrid


@dataclass
class LabelMap:
    """One drawn label map ``(1, X, Y, Z)`` with what the synthesis and the loss need."""

    labels: torch.Tensor
    skull_labels: tuple[int, ...]  # labels the generator may strip (skull on/off)
    loss_labels: torch.Tensor  # lookup: label -> label used in the loss (0 = ignored)
    source: str
    labels_2: torch.Tensor | None = None  # a second subject's map (inter-subject pair)


def grid_matrix(shape: tuple[int, int, int], voxel_mm: float, center: np.ndarray) -> np.ndarray:
    """Voxel-to-RAS matrix of an LIA training grid of ``shape`` voxels of ``voxel_mm`` mm,
    centred (FreeSurfer style, voxel ``shape / 2``) on ``center``."""
    if len(set(shape)) != 1:
        raise ValueError(f"the training grid must be a cube, got {shape}")
    scale = np.diag([voxel_mm] * 3 + [1.0])
    # net_to_ras is in 1 mm voxels; a grid of n voxels of v mm spans the same n*v mm
    return net_to_ras(center, shape[0] * voxel_mm) @ scale


def labels_on_grid(labels: np.ndarray, grid_to_voxel: np.ndarray,
                   shape: tuple[int, int, int]) -> torch.Tensor:
    """Nearest-neighbour resampling of a label map onto the training grid, given the map
    from training-grid voxels to the label map's voxels (off-map voxels are background)."""
    points = affine_points(grid_to_voxel, shape, dtype=torch.float64)
    return sample_nearest(torch.from_numpy(labels.astype(np.int64)), points, fill=0)


def template_on_grid(labels: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
                     voxel_mm: float) -> torch.Tensor:
    """Nearest-neighbour resampling of a template label map onto the training grid
    centred on the template (off-template voxels are background)."""
    center = ImageGrid.make(labels.shape, affine).center_ras
    mat = np.linalg.inv(affine) @ grid_matrix(shape, voxel_mm, center)
    return labels_on_grid(labels, mat, shape)


def subject_on_grid(subject: SubjectLabels, shape: tuple[int, int, int],
                    voxel_mm: float) -> torch.Tensor:
    """A real subject's map on the training grid centred on the affine reference (set by
    :func:`~synthmorph_nipype.synthesis.label_maps.align`): its brain lies in the middle,
    in the reference's position, orientation and size."""
    if subject.to_reference is None:
        raise ValueError(f"{subject.path}: not aligned to the reference")
    mat = (np.linalg.inv(subject.affine) @ np.linalg.inv(subject.to_reference)
           @ grid_matrix(shape, voxel_mm, np.zeros(3)))
    return labels_on_grid(subject.labels, mat, shape)


class LabelSource:
    """Draws training label maps: template brains or random shapes.

    Parameters
    ----------
    shape : tuple of int
        Training grid (a cube), e.g. ``(96, 96, 96)``.
    voxel_mm : float
        Voxel size of the training grid.
    shapes_prob : float
        Probability that a draw is a random-shapes map rather than a brain.
    head_prob : float
        Probability that a brain comes with the synthetic non-brain head.
    num_heads : int
        Number of different synthetic heads made up front (each a random thickness map).
    seed : int
        Seed of the head shells.
    label_maps : sequence of SubjectLabels, optional
        Real subjects' label maps (:func:`~synthmorph_nipype.synthesis.label_maps.
        read_label_map`); brains then come from them instead of the template. They are
        aligned here (all together) unless every one already has ``to_reference``.
    inter_subject_prob : float
        With label maps: probability that a pair comes from two different subjects
        rather than one subject warped twice.
    """

    def __init__(self, shape=(96, 96, 96), voxel_mm: float = 2.0, *, shapes_prob: float = 0.5,
                 head_prob: float = 0.5, num_heads: int = 4, seed: int = 0,
                 label_maps=None, inter_subject_prob: float = 0.5):
        self.shape = tuple(int(s) for s in shape)
        self.voxel_mm = float(voxel_mm)
        self.shapes_prob = float(shapes_prob)
        self.head_prob = float(head_prob)
        self.inter_subject_prob = float(inter_subject_prob)
        self.brains: list[tuple[torch.Tensor, tuple[int, ...], int]] = []
        self.subjects: list[tuple[torch.Tensor, tuple[int, ...]]] = []
        self.lookup: torch.Tensor | None = None
        if label_maps:
            self._add_subjects(list(label_maps))
        elif self.shapes_prob < 1:
            res = 1 if self.voxel_mm < 2 else 2
            lab, aff, names = template_labels(res, head=False, subdivide=True)
            num_brain = max(names) + 1
            self.brains.append((self._place(lab, aff), (), num_brain))
            for k in range(num_heads if self.head_prob > 0 else 0):
                lab, aff, names = template_labels(res, head=True, subdivide=True,
                                                  generator=seed + k)
                skull = tuple(n for n in names if n >= num_brain)
                self.brains.append((self._place(lab, aff), skull, num_brain))

    def _place(self, lab: np.ndarray, aff: np.ndarray) -> torch.Tensor:
        return template_on_grid(lab, aff, self.shape, self.voxel_mm)

    def _add_subjects(self, maps: list[SubjectLabels]) -> None:
        if any(m.to_reference is None for m in maps):
            align(maps)
        counted = loss_labels(maps)
        top = max(int(m.labels.max()) for m in maps) + 1
        lookup = torch.zeros(max(top, max(counted) + 1), dtype=torch.long)
        lookup[list(counted)] = torch.arange(1, len(counted) + 1)
        self.lookup = lookup
        for m in maps:
            lab = subject_on_grid(m, self.shape, self.voxel_mm)
            self.subjects.append((lab, m.head_labels))

    def _draw_subjects(self, generator: torch.Generator, device) -> LabelMap:
        u = torch.rand(2, generator=generator).tolist()
        n = len(self.subjects)
        a = int(torch.randint(0, n, (1,), generator=generator))
        b = (a + 1 + int(torch.randint(0, max(n - 1, 1), (1,), generator=generator))) % n
        lab, skull = self.subjects[a]
        labels_2, source = None, "subject"
        if n > 1 and u[0] < self.inter_subject_prob:
            labels_2, skull_2 = self.subjects[b]
            skull = tuple(sorted(set(skull) | set(skull_2)))
            labels_2, source = labels_2[None].to(device), "subjects"
        if u[1] >= self.head_prob:  # this pair keeps no head at all
            source += "-stripped"
            lab = remove_labels(lab, skull)
            labels_2 = None if labels_2 is None else remove_labels(labels_2, skull)
            skull = ()
        return LabelMap(lab[None].to(device), skull,
                        self.lookup.to(device), source, labels_2)

    def draw(self, generator: torch.Generator, device: torch.device | str = "cpu") -> LabelMap:
        """One label map, drawn with ``generator`` (the same state gives the same map)."""
        u = torch.rand(2, generator=generator).tolist()
        pick = int(torch.randint(0, 1 << 30, (1,), generator=generator))
        if not (self.brains or self.subjects) or u[0] < self.shapes_prob:
            lab = random_shapes(self.shape, generator=generator, device=device)
            n = int(lab.max()) + 1
            return LabelMap(lab, (), torch.arange(n, device=device), "shapes")
        if self.subjects:
            return self._draw_subjects(generator, device)
        heads = self.brains[1:]
        if heads and u[1] < self.head_prob:
            lab, skull, num_brain = heads[pick % len(heads)]
            source = "brain+head"
        else:
            lab, skull, num_brain = self.brains[0]
            source = "brain"
        n = int(lab.max()) + 1
        lookup = torch.arange(n, device=device)
        lookup[num_brain:] = 0  # the loss sees brain labels only: the head is to be ignored
        return LabelMap(lab[None].to(device), skull, lookup, source)
