"""Training configuration: one dataclass, read from a JSON or TOML file.

Unknown keys are errors (a typo must not silently train the wrong model). Every key has
a default, so an empty file trains the default model of the chosen kind.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import InputError
from ..models.affine import AffineConfig
from ..models.joint import UNetConfig
from ..synthesis.generator import SynthConfig
from ..vocabulary import EXTENTS, TRAINED_MODELS, check
from .distill import Distillation

RAMPED = ("noise_min", "noise_max", "blur_max_mm", "bias_std", "gamma_std", "res_prob",
          "crop_prob", "skull_prob")

# Widths of the embedded defaults (small enough to ship and to run fast on a CPU).
DEFAULT_WIDTHS = {
    "affine": {"num_feat": 32, "enc_nf": [32, 32, 32, 32], "add_nf": [32, 32]},
    "rigid": {"num_feat": 32, "enc_nf": [32, 32, 32, 32], "add_nf": [32, 32]},
    "joint": {"hyp_units": [32, 32, 32, 16], "enc_nf": [16, 16, 16, 16],
              "dec_nf": [16, 16, 16, 16], "add_nf": [16, 16]},
}
# Synthesis changes per model: the deformable network sees affinely aligned pairs, so its
# pairs differ by a residual affine only (the affine network's ranges are the defaults).
DEFAULT_SYNTH = {
    "affine": {"warp_std_mm": 1.0},
    "rigid": {"warp_std_mm": 1.0, "scale": 0.0, "shear": 0.0},
    "joint": {"shift_mm": 3.0, "rotate_deg": 3.0, "scale": 0.03, "shear": 0.02},
}


@dataclass
class TrainConfig:
    """What ``synthmorph train`` does; lengths in mm, steps in optimizer updates."""

    model: str = "joint"
    widths: dict = field(default_factory=dict)  # model configuration (defaults per model)
    steps: int = 10000
    lr: float = 1e-4
    # learning-rate decay: from step lr_decay_start the rate falls along a half cosine
    # to lr_final at the last step (None: constant); both may change when resuming
    lr_decay_start: int | None = None
    lr_final: float = 1e-5
    # largest gradient norm an update uses (larger ones are scaled down to it; None: no
    # clipping); the norm before clipping is logged as grad_norm
    grad_clip: float | None = None
    seed: int = 0
    grid: int = 96  # training grid edge in voxels (half-resolution network space)
    crop: int | None = None  # train on random cubes of this edge cut from each pair
    voxel_mm: float = 2.0
    shapes_prob: float = 0.5  # random-shape label maps vs brains
    head_prob: float = 0.5  # brains with a (synthetic or real) head, then skull on/off
    # whole-head label maps of real subjects (a folder, or files and glob patterns,
    # relative to the working directory); brains come from them instead of the template
    label_maps: str | list[str] | None = None
    inter_subject_prob: float = 0.5  # pairs from two different subjects (with label_maps)
    # supervised terms where the synthetic truth is known: the detector's mean distance
    # to the true map (voxels) over brain voxels; the deformable end-point error (voxels)
    # for pairs made from one anatomy, inside the similarity term
    supervised_weight: float = 0.0
    synth: dict = field(default_factory=dict)  # SynthConfig changes (over DEFAULT_SYNTH)
    # curriculum: over the first warmup_steps the augmentations (noise, blur, bias, gamma,
    # resolution loss, cropping, and the stripping of one image's head: a head next to a
    # stripped brain kept a fresh U-Net at the identity) ramp up from none and the share
    # of pairs whose images share one contrast falls from all to same_contrast_final
    warmup_steps: int = 0
    same_contrast_final: float = 0.0
    similarity: str = "label_mse"
    regularizer: str = "grad_l2"
    # spatially varying regularisation (joint): a U-Net with a lambda head instead of the
    # hypernetwork, a Beta(prior_alpha, 1) prior on the map and its weighted gradient
    # penalty (see training.tasks.DeformTask)
    spatial_lambda: bool = False
    prior_alpha: float = 1.1  # Chen et al. tuned alpha - 1 within [0.01, 0.2]
    penalty_weight: float = 1.0
    int_steps: int = 7
    # joint: train the U-Net as a cascade of this many passes (the loss sees their sum;
    # the exported weights recommend as many, the engine's --passes)
    passes: int = 1
    # joint, 4 mm grid: distillation (training.distill): with probability distill_prob a
    # step adds, inside the similarity term (x (1 - 0.5) in the objective: such a step
    # feeds lambda 0.5), distill_weight x the end-point error (voxels) to the field that
    # distill_iterations steps of the test-time refinement (distill_similarity,
    # smoothness distill_lambda) reach from the U-Net's own; 0: off
    distill_weight: float = 0.0
    distill_prob: float = 0.5
    distill_iterations: int = 20
    distill_similarity: str = "mind+mi"
    distill_lambda: float = 0.85
    val_pairs: int = 8
    val_every: int = 250
    ckpt_every: int = 50
    amp: str | bool = "auto"  # mixed precision: auto = on for CUDA and bfloat16-capable CPUs
    device: str = "auto"
    threads: int | None = None
    affine_weights: str | None = None  # joint: affine .pt bundled into the exported model
    # objective "similarity": VoxelMorph-style training on a user's
    # images (a folder, a BIDS dataset or a list) with an image similarity ("ncc", "mse",
    # "mind"), starting from init_weights (a joint .pt, e.g. the embedded model: its
    # detector aligns the pairs)
    objective: str = "synthetic"
    images: str | None = None
    init_weights: str | list[str] | None = None
    extent: int = 192

    def __post_init__(self):
        if self.model not in TRAINED_MODELS:
            raise ValueError(f"model must be one of {', '.join(TRAINED_MODELS)}, "
                             f"got {self.model!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.steps < 0 or self.grid < 16 or self.grid % 16:
            raise ValueError("steps must be >= 0 and grid a multiple of 16")
        if self.lr_decay_start is not None and not 0 <= self.lr_decay_start <= self.steps:
            raise ValueError("lr_decay_start must lie between 0 and steps")
        if self.crop is not None and not (
                16 <= self.crop and self.crop % 16 == 0
                and (self.objective == "similarity" or self.crop <= self.grid)):
            raise ValueError("crop must be a multiple of 16 no larger than grid")
        if self.objective not in ("synthetic", "similarity"):
            raise ValueError("objective must be synthetic or similarity, got "
                             f"{self.objective!r}")
        if self.objective == "similarity":
            if self.model != "joint" or not self.images:
                raise ValueError("the similarity objective trains a joint model and needs "
                                 "images")
            if self.similarity == "label_mse":  # the label default has no image meaning
                self.similarity = "ncc"
            check("extent", self.extent, EXTENTS)
            if self.voxel_mm != 2.0:  # pairs come at the engine's half resolution
                raise ValueError("the similarity objective trains on the 2 mm grid "
                                 "(voxel_mm 2)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError("grad_clip must be > 0 (or absent: no clipping)")
        if not 0 <= self.same_contrast_final <= 1:
            raise ValueError("same_contrast_final must lie in [0, 1]")
        if not 0 <= self.inter_subject_prob <= 1 or self.supervised_weight < 0:
            raise ValueError("inter_subject_prob must lie in [0, 1] and supervised_weight "
                             "be >= 0")
        if self.spatial_lambda and self.model != "joint":
            raise ValueError("spatial_lambda needs the joint model")
        if self.passes < 1 or (self.passes > 1 and self.model != "joint"):
            raise ValueError("passes must be >= 1, and > 1 only for the joint model")
        if self.distill_weight and (self.model != "joint" or self.objective != "synthetic"
                                    or self.spatial_lambda or self.voxel_mm != 4.0):
            raise ValueError("distillation trains the joint model's hypernetwork U-Net on "
                             "synthetic pairs on the 4 mm grid (voxel_mm 4: the engine's "
                             "refinement level)")
        self.distillation()  # validate early
        if self.prior_alpha < 1 or self.penalty_weight < 0:
            raise ValueError("prior_alpha must be >= 1 and penalty_weight >= 0")
        if self.voxel_mm not in (2.0, 4.0):
            raise ValueError("voxel_mm must be 2 or 4 (the engine's networks see a 2 mm grid, "
                             "which a model trained at 4 mm pools)")
        self.widths = {**DEFAULT_WIDTHS[self.model], **self.widths}
        self.synth_config()  # validate early
        self.model_config()

    def distillation(self) -> Distillation:
        """The distillation settings (:mod:`~synthmorph_nipype.training.distill`)."""
        return Distillation(weight=self.distill_weight, prob=self.distill_prob,
                            iterations=self.distill_iterations,
                            similarity=self.distill_similarity, lam=self.distill_lambda)

    def synth_config(self) -> SynthConfig:
        changes = {**DEFAULT_SYNTH[self.model], **self.synth}
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return SynthConfig(voxel_size=self.voxel_mm, **changes)

    def synth_at(self, step: int) -> tuple[SynthConfig, float]:
        """Synthesis at ``step`` and the probability of a same-contrast pair (curriculum)."""
        target, final = self.synth_config(), self.same_contrast_final
        if step >= self.warmup_steps:
            return target, final
        t = step / self.warmup_steps
        ramp = {k: t * getattr(target, k) for k in RAMPED}
        return target.replace(**ramp), final + (1.0 - final) * (1.0 - t)

    def lr_at(self, step: int) -> float:
        """The learning rate of update number ``step`` (counting from 1).

        >>> cfg = TrainConfig(model="affine", steps=100, lr=1e-3, lr_decay_start=50,
        ...                   lr_final=1e-5)
        >>> cfg.lr_at(10), cfg.lr_at(50), round(cfg.lr_at(75), 6), cfg.lr_at(100)
        (0.001, 0.001, 0.000505, 1e-05)
        """
        start = self.lr_decay_start
        if start is None or step <= start:
            return self.lr
        t = min(1.0, (step - start) / max(1, self.steps - start))
        return self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * t))

    def model_config(self) -> AffineConfig | UNetConfig:
        """The network configuration the widths describe."""
        if self.model == "joint":
            return UNetConfig.from_dict({**self.widths, "lambda_head": self.spatial_lambda})
        return AffineConfig.from_dict({**self.widths, "rigid": self.model == "rigid"})

    def prepool(self) -> int:
        """Pooling of the engine's 2 mm network grid down to the training grid, which the
        exported networks apply to their input."""
        return int(round(self.voxel_mm / 2.0))

    def label_map_files(self) -> list[Path]:
        """The label maps ``label_maps`` names (folders listed, patterns expanded)."""
        from ..synthesis.label_maps import label_map_files

        if not self.label_maps:
            return []
        entries = [self.label_maps] if isinstance(self.label_maps, str) else self.label_maps
        files: list[Path] = []
        for entry in entries:
            if any(c in entry for c in "*?["):
                found = sorted(Path().glob(entry)) if not Path(entry).is_absolute() else \
                    sorted(Path("/").glob(entry.lstrip("/")))
                if not found:
                    raise InputError(f"{entry}: matches no label maps")
                files.extend(found)
            else:
                files.extend(label_map_files(entry))
        return files

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**data)


def read_config(path: str | Path | None, **overrides) -> TrainConfig:
    """Read a ``.json`` or ``.toml`` training configuration; ``overrides`` (not None) win."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror})") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as err:
            raise InputError(f"{path}: not valid {path.suffix[1:] or 'json'} ({err})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a table of settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        where = f"{path}: " if path is not None else ""
        raise InputError(f"{where}invalid training configuration ({err})") from None
