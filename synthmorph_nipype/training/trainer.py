"""The training loop: synthetic pairs in, a checkpoint and logs out.

One step draws a label map, synthesises a pair from it (:mod:`..synthesis.generator`),
and takes one Adam step on the task's loss. Everything random comes from one seeded
:class:`torch.Generator` whose state is saved with the checkpoint, so an interrupted run
resumes where it stopped and gives the same result as an uninterrupted one (on the same
device and thread count). Output directory:

``checkpoint.pt``  model, optimizer and generator state (resume); ``weights_only`` safe
``model.pt``       the trained network in the package's model format (for ``-w``)
``train.csv``      one row per step: loss and its terms, seconds
``val.csv``        validation figures on a fixed set of synthetic pairs
``log.jsonl``      the same as JSON lines, plus the configuration
"""

from __future__ import annotations

import csv
import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import MISSING, fields, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch

from ..engine.device import pick_device, set_threads
from ..engine.weights import load_parts
from ..io.atomic import OutputSet
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.joint import HyperUNet
from ..ops.grid import apply_affine, voxel_grid
from ..ops.sampling import sample_linear
from ..synthesis.generator import SynthConfig, sample_pair
from ..synthesis.label_maps import read_label_map
from .config import TrainConfig
from .data import LabelSource
from .images import ImagePairs, image_files
from .losses import one_hot
from .tasks import TASKS, Pair, Task, load_start

STATE = "synthmorph-nipype-training"
# settings a resumed run may change (everything else must match the checkpoint)
RESUMABLE = {"steps", "threads", "device", "val_every", "ckpt_every", "affine_weights",
             "lr_decay_start", "lr_final", "grad_clip"}
# test-time refinement a starting model recommends: a model fine-tuned from it keeps it
RECOMMENDATIONS = ("refine_affine", "refine", "refine_similarity", "refine_lambda",
                   "passes", "refine_passes")


def starting_weights(paths: str | list[str]) -> dict:
    """The detector (if any) and hyper U-Net that fine-tuning starts from: one or more
    files, our ``.pt`` or FreeSurfer's Keras ``.h5`` (e.g. ``synthmorph.affine.2.h5`` and
    ``synthmorph.deform.3.h5``); the first file holding each part wins. ``"meta"`` holds
    the refinement the ``.pt`` files recommend (the first file naming each setting)."""
    found: dict = {"affine": None, "deform": None}
    meta: dict = {}
    for path in [paths] if isinstance(paths, str) else paths:
        affine, deform, file_meta = load_parts(path)
        for key in RECOMMENDATIONS:
            if key in file_meta:
                meta.setdefault(key, file_meta[key])
        found["affine"] = found["affine"] or affine
        found["deform"] = found["deform"] or deform
    if not isinstance(found["deform"], HyperUNet):
        names = paths if isinstance(paths, str) else ", ".join(paths)
        raise ValueError(f"{names}: holds no hypernetwork U-Net to fine-tune")
    return {**found, "meta": meta}


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """The state of a training checkpoint (``weights_only``); ValueError naming the file
    when it is unreadable or not one of ours."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated or foreign file
        raise ValueError(f"{path}: not a readable training checkpoint "
                         f"({err.__class__.__name__}); use --restart") from None
    if not isinstance(state, dict) or state.get("format") != STATE:
        raise ValueError(f"{path}: not a synthmorph training checkpoint")
    return state


def resumes_without_start(config: TrainConfig, outdir: str | Path) -> bool:
    """Whether synthetic training continued from ``config.init_weights`` resumes from the
    checkpoint in ``outdir`` while those starting weights are gone (a later session keeps
    only the checkpoint, which holds the weights and their advice)."""
    if config.objective != "synthetic" or not config.init_weights:
        return False
    paths = config.init_weights
    files = [paths] if isinstance(paths, str) else paths
    return (Path(outdir) / "checkpoint.pt").is_file() and not all(
        Path(p).exists() for p in files)


@torch.no_grad()
def start_from(model: torch.nn.Module, paths: str | list[str], part: str) -> dict:
    """Load ``part`` ("affine" or "deform") of the first weights file holding it into
    ``model`` (the same architecture; input pooling aside) and return the refinement the
    file recommends."""
    for path in [paths] if isinstance(paths, str) else paths:
        affine, deform, meta = load_parts(path)
        found = affine if part == "affine" else deform
        if found is None:
            continue
        try:
            model.load_state_dict(found.state_dict())
        except RuntimeError:
            raise ValueError(f"{path}: its {part} network has another architecture than "
                             "the configured widths") from None
        return {k: meta[k] for k in RECOMMENDATIONS if k in meta}
    names = paths if isinstance(paths, str) else ", ".join(paths)
    raise ValueError(f"{names}: holds no {part} network to start from")


def autocast_for(device: torch.device, amp: str | bool):
    """Mixed-precision context: float16 on CUDA (bfloat16 where supported), bfloat16 on a
    CPU with native bfloat16; ``amp=False`` switches it off."""
    if amp is False or amp == "off":
        return nullcontext
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return partial(torch.autocast, "cuda", dtype=dtype)
    if amp is True or amp == "on" or _cpu_has_bf16():
        return partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    return nullcontext


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def crop_pair(pair: Pair, size: int, generator: torch.Generator) -> Pair:
    """The same random cube of edge ``size`` cut from both images and label maps (pairs
    of images without labels: from the images).

    >>> p = crop_pair(Pair(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), None, None),
    ...               4, torch.Generator().manual_seed(0))
    >>> tuple(p.image_1.shape), p.onehot_1
    ((1, 1, 4, 4, 4), None)
    """
    shape = pair.image_1.shape[2:]
    lo = [int(torch.randint(0, n - size + 1, (1,), generator=generator)) for n in shape]
    cut = (..., *(slice(a, a + size) for a in lo))
    return Pair(*(None if t is None else t[cut].contiguous()
                  for t in (pair.image_1, pair.image_2, pair.onehot_1, pair.onehot_2)))


def make_pair(source: LabelSource, synth: SynthConfig, generator: torch.Generator,
              device: torch.device, same_contrast: bool = False,
              displacement: bool = False) -> Pair:
    """One synthetic pair on ``device``.

    ``truth`` is the fixed -> moving voxel map of the pair's affine draws (exact when
    there is no warp and both images come from one anatomy; for two subjects normalised to
    one reference, the affine between them). With ``displacement``, pairs made from one
    anatomy also carry the true dense fixed -> moving displacement (``disp_truth``).
    """
    lm = source.draw(generator, device)
    cfg = synth.replace(skull_labels=lm.skull_labels)
    out = sample_pair(lm.labels, cfg, generator, same_contrast=same_contrast,
                      labels_2=lm.labels_2, inverse=displacement)
    n = int(lm.loss_labels.max()) + 1
    oh1 = one_hot(lm.loss_labels[out["labels_1"]], n)
    oh2 = one_hot(lm.loss_labels[out["labels_2"]], n)
    truth = torch.linalg.inv(out["affine_1"][0].double()) @ out["affine_2"][0].double()
    flipped = bool(out["flips"].any())
    flip = torch.eye(4, dtype=torch.float64, device=truth.device)
    for a, on in enumerate(out["flips"][0].tolist()):
        if on:
            flip[a, a], flip[a, 3] = -1.0, lm.labels.shape[1 + a] - 1.0
    disp = None
    if displacement and lm.labels_2 is None and not flipped:
        disp = true_displacement(out["affine_1"][0], out["affine_2"][0], out["inv_disp_1"][0],
                                 out["disp_2"][0])
    truth = (flip @ truth @ flip).cpu()
    return Pair(out["image_1"], out["image_2"], oh1, oh2, truth, out["labels_1"],
                out["labels_2"], disp, lm.source)


def true_displacement(affine_1: torch.Tensor, affine_2: torch.Tensor,
                      inv_disp_1: torch.Tensor, disp_2: torch.Tensor) -> torch.Tensor:
    """Fixed -> moving displacement ``(X, Y, Z, 3)`` (voxels) of a pair made from one label
    map, image ``k`` showing the map at ``affine_k @ (x + disp_k(x))``: voxel ``x`` of the
    fixed image (2) shows what moving voxel ``phi_1^-1(affine_1^-1 affine_2 (x + disp_2))``
    shows."""
    shape = disp_2.shape[:3]
    grid = voxel_grid(shape, dtype=torch.float32, device=disp_2.device)
    rel = torch.linalg.inv(affine_1.double()) @ affine_2.double()
    z = apply_affine(rel.float(), grid + disp_2)
    back = sample_linear(inv_disp_1, z, boundary="clamp")
    return z + back - grid


def label_source(config: TrainConfig) -> LabelSource:
    """The label maps a configuration trains on."""
    maps = [read_label_map(f) for f in config.label_map_files()]
    return LabelSource((config.grid,) * 3, config.voxel_mm, shapes_prob=config.shapes_prob,
                       head_prob=config.head_prob, seed=config.seed, label_maps=maps,
                       inter_subject_prob=config.inter_subject_prob)


class Progress:
    """A one-line progress bar with the running loss (a line per ``every`` steps when the
    stream is not a terminal)."""

    def __init__(self, total: int, start: int = 0, stream=sys.stderr, every: int = 50):
        self.total, self.start, self.stream, self.every = total, start, stream, every
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.monotonic()
        self.running: float | None = None

    def update(self, step: int, loss: float) -> None:
        a = 0.98 if self.running is not None else 0.0
        self.running = a * (self.running or 0.0) + (1 - a) * loss
        done = step - self.start
        rate = (time.monotonic() - self.t0) / max(done, 1)
        eta = rate * (self.total - step)
        frac = step / max(self.total, 1)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = (f"step {step}/{self.total} [{bar}] loss {self.running:.4f} "
                f"{rate:.2f} s/step eta {eta / 60:.1f} min")
        if self.tty:
            self.stream.write("\r" + line)
            if step == self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()


def _append(path: Path, row: dict) -> None:
    """Append ``row`` to a CSV file; a row with new columns (a run resumed by a newer
    version) rewrites the file under the union of the columns, earlier rows left blank
    there."""
    columns = list(row)
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header and not set(columns) <= set(header):
            with path.open(newline="") as f:
                old = list(csv.DictReader(f))
            header += [c for c in columns if c not in header]
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(old)
        columns = header or columns
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def other_settings(saved: dict, config: TrainConfig) -> list[str]:
    """The settings of ``config`` that differ from those a checkpoint was ``saved`` with,
    the resumable ones aside (settings added since it was written count as their
    defaults)."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    theirs = {**defaults, **saved}
    return sorted(k for k, v in config.to_dict().items()
                  if k not in RESUMABLE and theirs.get(k) != v)


class Trainer:
    """Train ``config.model`` into ``outdir`` (resuming from its checkpoint if present)."""

    def __init__(self, config: TrainConfig, outdir: str | Path, *, log=sys.stderr):
        self.config = config
        self.outdir = Path(outdir)
        self.log = log
        self.device = pick_device({"auto": None, "cpu": False, "cuda": True}[config.device])
        if config.threads:
            set_threads(config.threads)
        self.autocast = autocast_for(self.device, config.amp)
        kwargs = {"similarity": config.similarity}
        if config.objective == "synthetic":
            kwargs["supervised_weight"] = config.supervised_weight
            if config.model == "joint":
                kwargs["distill"] = config.distillation()
        if config.model == "joint":
            kwargs.update(regularizer=config.regularizer, steps=config.int_steps,
                          prior_alpha=config.prior_alpha, penalty_weight=config.penalty_weight,
                          passes=config.passes)
        self.detector = self.images = None
        self.recommended: dict = {}  # refinement settings the starting model recommends
        task_name, model_config, init = config.model, config.model_config(), None
        if config.objective == "similarity":
            task_name = "images"
            if config.init_weights:
                init = starting_weights(config.init_weights)
                model_config = replace(init["deform"].config,
                                       lambda_head=config.spatial_lambda)
                if init["affine"] is not None:
                    self.detector = init["affine"].to(self.device).eval()
                self.recommended = init["meta"]
        with torch.random.fork_rng(devices=[]):  # the seed fixes the initial weights too
            torch.manual_seed(config.seed)
            self.task: Task = TASKS[task_name](model_config, **kwargs)
        if init is not None:
            load_start(self.task.model, init["deform"])
        elif config.init_weights and not resumes_without_start(config, self.outdir):
            # synthetic training continued from trained weights (a run that has a
            # checkpoint resumes from it: its starting file is no longer needed)
            self.recommended = start_from(self.task.model, config.init_weights,
                                          "deform" if config.model == "joint" else "affine")
        self.task.model.to(self.device)
        if config.objective == "similarity":
            self.images = ImagePairs(image_files(config.images), config.extent, self.device)
        self.optimizer = torch.optim.Adam(self.task.model.parameters(), lr=config.lr)
        self.source = label_source(config) if config.objective == "synthetic" else None
        self.synth = config.synth_config()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.stopped: str | None = None  # the signal that stopped the last run()
        self._val: list[Pair] | None = None

    # -- state ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": STATE, "step": self.step, "config": self.config.to_dict(),
                "model": self.task.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "recommended": self.recommended}

    def save(self) -> None:
        with OutputSet() as out:
            torch.save(self.state(), out.temp(self.outdir / "checkpoint.pt"))

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` if there is one; refuse one made with other settings."""
        path = self.outdir / "checkpoint.pt"
        if not path.exists():
            return False
        state = read_checkpoint(path, self.device)
        diff = other_settings(state["config"], self.config)
        if diff:
            raise ValueError(f"{path}: made with other settings ({', '.join(diff)}); "
                             "use another output directory or --restart")
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if "recommended" in state:  # the starting weights' advice, for the export
            self.recommended = dict(state["recommended"])
        self.step = int(state["step"])
        return True

    def _draw(self, generator: torch.Generator, synth: SynthConfig, same: bool) -> Pair:
        """A training pair: synthetic, or two of the user's images in their mid-space."""
        if self.images is not None:
            img_1, img_2 = self.images.pair(generator, self.detector)
            return Pair(img_1, img_2, None, None)
        displacement = self.config.model == "joint" and self.config.supervised_weight > 0
        return make_pair(self.source, synth, generator, self.device, same, displacement)

    # -- validation -------------------------------------------------------------------
    def validation_pairs(self) -> list[Pair]:
        """A fixed set of pairs (its own seed, independent of the training draws)."""
        if self._val is None:
            gen = torch.Generator().manual_seed(self.config.seed + 1_000_003)
            synth = self.synth
            if self.config.model != "joint":  # affine truth needs pairs without warps
                synth = synth.replace(warp_std_mm=0.0)
            self._val = [self._draw(gen, synth, False) for _ in range(self.config.val_pairs)]
        return self._val

    def validate(self) -> dict[str, float]:
        """Mean figures over the validation pairs; where some pairs are random shapes and
        others brains, also the brains' own means (``*_brain``)."""
        self.task.model.eval()
        pairs = self.validation_pairs()
        rows = [self.task.evaluate(p) for p in pairs]
        self.task.model.train()
        if not rows:
            return {}
        out = _means(rows)
        brains = [r for r, p in zip(rows, pairs, strict=True) if p.source not in ("", "shapes")]
        if brains and len(brains) < len(rows):
            out |= {f"{k}_brain": v for k, v in _means(brains).items()}
        return out

    # -- loop -------------------------------------------------------------------------
    def export(self, path: Path | None = None, extra: dict | None = None) -> Path:
        """Write the trained network in the package's model format (``model.pt``)."""
        path = path or self.outdir / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = self.task.export()
        pool = self.config.prepool()
        if pool > 1:  # the same weights, pooling the engine's 2 mm input
            for key, trained in list(parts.items()):
                pooled = type(trained)(replace(trained.config, prepool=pool))
                pooled.load_state_dict(trained.state_dict())
                parts[key] = pooled
        if self.detector is not None and not self.config.affine_weights:
            parts["affine"] = self.detector  # fine-tuned models keep their detector
        meta = {"trained_steps": self.step, "date": datetime.now(UTC).date().isoformat(),
                "training_config": json.dumps(self.config.to_dict()), **self.recommended}
        if self.config.passes > 1:  # trained as a cascade: run as one
            meta["passes"] = self.config.passes
        if self.config.model == "joint" and self.config.affine_weights:
            bundled = load_checkpoint(self.config.affine_weights)
            parts["affine"] = bundled["affine"]
            if "refine_affine" in bundled["meta"]:  # the detector's recommendation travels
                meta["refine_affine"] = bundled["meta"]["refine_affine"]
        meta.update(extra or {})
        with OutputSet() as out:
            save_checkpoint(out.temp(path), meta=meta, **parts)
        return path

    def run(self, progress: bool = True, max_minutes: float | None = None) -> dict[str, float]:
        """Train up to ``config.steps`` (or until ``max_minutes`` have passed: then stop
        after the current step, checkpoint and export, ready to resume). A SIGTERM or
        SIGINT (``kill``, Ctrl-C, a job scheduler's time limit) stops the same way, without
        the validation (``self.stopped`` names the signal); a second one stops at once."""
        with _StopRequest() as stop:
            metrics = self._run(progress, max_minutes, stop)
        self.stopped = stop.signal
        return metrics

    def _run(self, progress: bool, max_minutes: float | None, stop: _StopRequest
             ) -> dict[str, float]:
        self.outdir.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
        with (self.outdir / "log.jsonl").open("a") as f:
            f.write(json.dumps({"event": "start", "step": self.step, "config": cfg.to_dict(),
                                "device": str(self.device)}) + "\n")
        bar = Progress(cfg.steps, self.step, self.log) if progress else None
        self.task.model.train()
        metrics: dict[str, float] = {}
        while self.step < cfg.steps:
            t0 = time.monotonic()
            synth, p_same = cfg.synth_at(self.step)
            same = bool(torch.rand((), generator=self.generator) < p_same) if p_same else False
            pair = self._draw(self.generator, synth, same)
            if cfg.crop and cfg.crop < min(pair.image_1.shape[2:]):
                pair = crop_pair(pair, cfg.crop, self.generator)
            try:
                loss, terms = self.task.loss(pair, self.generator, self.autocast)
            except torch.linalg.LinAlgError as err:  # e.g. all feature maps empty: no fit
                with (self.outdir / "log.jsonl").open("a") as f:
                    f.write(json.dumps({"event": "skipped", "step": self.step + 1,
                                        "reason": str(err).splitlines()[0]}) + "\n")
                continue
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {self.step + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr_at(self.step + 1)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(
                self.task.model.parameters(),
                math.inf if cfg.grad_clip is None else cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            row = {"step": self.step, "loss": value, **terms, "grad_norm": float(norm),
                   "seconds": round(time.monotonic() - t0, 4)}
            _append(self.outdir / "train.csv", row)
            if bar:
                bar.update(self.step, value)
            last = self.step == cfg.steps or stop.signal is not None or (
                deadline is not None and time.monotonic() > deadline)
            if cfg.val_every and stop.signal is None and (self.step % cfg.val_every == 0
                                                          or last):
                metrics = self.validate()
                _append(self.outdir / "val.csv", {"step": self.step, **metrics})
                with (self.outdir / "log.jsonl").open("a") as f:
                    f.write(json.dumps({"event": "validation", "step": self.step,
                                        **metrics}) + "\n")
            if self.step % cfg.ckpt_every == 0 or last:
                self.save()
            if last:
                break
        if not metrics and cfg.val_pairs and stop.signal is None:
            metrics = self.validate()
        self.export(extra={f"val_{k}": round(v, 5) for k, v in metrics.items()})
        return metrics


class _StopRequest:
    """While training: SIGTERM and SIGINT ask the loop to stop after its current step
    (``signal`` is then the signal's name); a second one takes the signal's usual action.
    Handlers can only be set from the main thread: elsewhere nothing changes."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # asked twice: do what it would have done
            self._restore()
            signal.raise_signal(signum)
            return
        self.signal = signal.Signals(signum).name

    def _restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()
