"""``specopt train``: train a small Llama on the embedded corpus with Muon or AdamW.

One step, in order (the data flow of DESIGN.md)::

    x, y = sampler()                       # seeded random windows (resumable)
    loss = model.loss(x, y); backward      # PC layers compute W_eff from raw W, u, v, gamma
    clip_grad_norm_(1.0)                   # stop (no step) if the loss or norm is non-finite
    optimizer.step()                       # post-step hooks: PC refreshes u, v; the
                                           # spectral monitor logs spectra on its cadence
    scheduler.step()                       # linear warmup, cosine to final_lr_ratio * lr

Data parallel (``torchrun --nproc_per_node N -m specopt train --ddp`` or ``--fsdp``; gloo
on CPU): every rank builds the same model (same seed), wraps it (DDP, or FSDP2 per block),
and samples its own batches (seed + rank), so ``--batch-size`` is per rank and the global
batch is N times larger. Muon splits its Newton-Schulz work across ranks, the PC layer and
the monitor gather sharded weights where they need whole matrices, only rank 0 prints and
writes logs, and checkpoints are ``torch.distributed.checkpoint`` directories
(``checkpoints/step_<n>/``) that ``specopt.cli.dcp.load_distributed_checkpoint`` loads
on any world size (``--resume`` of a distributed run is not supported yet; ``inspect``
and ``merge`` read these folders).

Resume restores model (incl. PC buffers), optimizer, scheduler, RNG and sampler state,
so ``N`` straight steps and ``N/2 + resume + N/2`` give bit-identical parameters (also
after a ``kill -9``). Into the same run folder every step stays logged once (the writer
purges only steps after the checkpoint's; resuming from an older checkpoint rewinds the
run, and its newer checkpoints are moved to ``checkpoints/superseded_at_step_<n>/``).
Flags on resume: :data:`RESUME_OVERRIDES` are
applied (a new ``--steps`` continues the cosine from the LR reached at the checkpoint, a
new ``--lr`` rescales it, with a warning); any other flag must equal the checkpoint's or
the resume is refused with the list of differences. ``--device`` (cpu, cuda, auto) puts
model, PC buffers, optimizer state and the monitor's work on one device; ``--dtype bf16``
autocasts forward and loss. Every failure is a :class:`CommandError` (one line, exit 2).
Logged scalars (TensorBoard, in the run folder): ``train/loss`` (nats/byte),
``train/lr``, ``train/grad_norm``, ``perf/tokens_per_s``, ``val/loss`` (nats/byte),
``val/bpb`` (bits per byte); the monitor adds ``spectral/<metric>/<layer>``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from specopt.checkpoint import (
    TRAINING_KEYS,
    CheckpointError,
    capture_rng_state,
    check_optimizer_state,
    load_checkpoint,
    load_module_state,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
)
from specopt.cli._console import CommandError, console
from specopt.cli._files import refuse_nonfinite
from specopt.cli.dcp import save_distributed_checkpoint
from specopt.cli.launch import (
    NullWriter,
    broadcast_object,
    clip_grad_norm_,
    init_from_env,
    muon_mode,
    train_loss,
    unwrap,
    wrap_model,
)
from specopt.data import (
    BatchSampler,
    Corpus,
    DataError,
    bits_per_byte,
    eval_windows,
    load_corpus,
)
from specopt.distributed import get_rank, is_main_process
from specopt.models.llama import PRESETS, Llama, LlamaConfig

__all__ = [
    "DEFAULT_LR",
    "LOCK_FILE",
    "RESUME_OVERRIDES",
    "TrainConfig",
    "TrainResult",
    "add_parser",
    "auto_threads",
    "build_model",
    "lock_run_folder",
    "lr_factor",
    "run",
    "train",
]

#: Peak learning rates of the default run. Sweep on the default shape (tiny, 16 x 128,
#: 100 steps, no PC, final val bits/byte): muon 0.01: 3.26, 0.02: 3.05, 0.05: 3.08;
#: adamw 1e-3: 4.26, 3e-3: 3.62, 1e-2: 3.94. Muon's lr is build_optimizer's (adjust_lr_fn
#: "match_rms_adamw": update RMS about 0.2 * lr; its AdamW groups use the same lr).
DEFAULT_LR = {"muon": 0.02, "adamw": 3e-3}
#: PC level per optimizer, as in the published configs (Muon already orthogonalizes).
DEFAULT_PC_LEVEL = {"muon": 2, "adamw": 4}
CHECKPOINT_DIR = "checkpoints"
#: Seeds are below 2**63: torch generators take 64 bits, and rank r samples with seed + r.
MAX_SEED = 2**63
#: ``--device`` choices; "auto" is cuda when available, else cpu.
DEVICES = ("auto", "cpu", "cuda")
#: ``--dtype`` choices -> autocast dtype (None: no autocast, fp32 everywhere).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
#: Options a resume applies when given (the rest must equal the checkpoint's or the resume
#: is refused): ``steps`` continues the cosine from the current LR to the new end, ``lr``
#: rescales the schedule (with a warning); the others change no training math.
RESUME_OVERRIDES = ("steps", "lr", "log_dir", "ckpt_every", "keep_checkpoints", "eval_every",
                    "eval_batches", "monitor", "monitor_every", "monitor_budget", "threads",
                    "device")


@dataclass
class TrainConfig:
    """Options of one training run (the CLI flags; stored in every checkpoint)."""

    optimizer: str = "muon"  # "muon" (Muon on hidden matrices + AdamW) or "adamw"
    pc: bool = True  # PC layer on FFN w1/w2/w3 and attention wo
    pc_level: int | None = None  # None: 2 for muon, 4 for adamw
    # Default run sized to finish in about 2 minutes on a loaded 2-core CPU (README table).
    preset: str = "tiny"  # key of specopt.models.PRESETS
    steps: int = 250
    batch_size: int = 16
    seq_len: int = 128
    lr: float | None = None  # peak LR; None: DEFAULT_LR[optimizer]
    warmup: int = 25  # linear warmup steps
    final_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 0
    log_dir: str | None = None  # None: runs/<name>
    ckpt_every: int = 100  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # newest step checkpoints kept; 0: keep all
    monitor: bool = True
    monitor_every: int = 10
    monitor_budget: float = 0.05  # max monitor time / step time before it backs off; 0: never
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    data: str | None = None  # None: embedded stdlib corpus
    max_data_bytes: int = 4_000_000
    threads: int = 0  # torch intra-op threads; 0: auto (idle cores, see auto_threads)
    parallel: str | None = None  # "ddp" or "fsdp" under torchrun; None: one process
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when available)
    dtype: str = "fp32"  # "fp32", or "bf16": autocast of forward and loss (weights stay fp32)
    # Set by a resume that changes --steps after warmup (not a flag): from this optimizer
    # step the cosine restarts at the LR factor reached there, so the LR never jumps.
    lr_anchor_step: int | None = None
    lr_anchor_factor: float | None = None

    def __post_init__(self) -> None:
        from specopt.pc import PC_LEVELS

        def require(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        require(self.optimizer in DEFAULT_LR, "optimizer", "'muon' or 'adamw'")
        require(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}")
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "monitor_every",
                     "max_data_bytes"):
            require(getattr(self, name) > 0, name, "positive")
        for name in ("warmup", "ckpt_every", "eval_every", "keep_checkpoints", "seed", "threads"):
            require(getattr(self, name) >= 0, name, ">= 0")
        # torch generators take 64-bit seeds, and the sampler seeds each rank with seed + rank.
        require(self.seed < MAX_SEED, "seed", f"< 2**63 ({MAX_SEED})")
        # Floats: `not (lo <= x)` is also true for NaN, so NaN never passes a range check.
        require(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "lr",
                "a positive finite number")
        for name in ("weight_decay", "grad_clip"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name,
                    "a finite number >= 0")
        for name in ("monitor_budget", "final_lr_ratio"):
            require(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]")
        require(self.parallel in (None, "ddp", "fsdp"), "parallel", "None, 'ddp' or 'fsdp'")
        require(self.pc_level is None or self.pc_level in PC_LEVELS, "pc_level",
                f"one of the published levels {sorted(PC_LEVELS)}")
        if not self.pc and self.pc_level is not None:
            raise ValueError(f"pc_level {self.pc_level} is given but the PC layer is off "
                             "(no_pc): drop one of them")
        require(self.device in DEVICES, "device", f"one of {DEVICES}")
        require(self.dtype in DTYPES, "dtype", f"one of {sorted(DTYPES)}")
        cpus = available_cpus()
        require(self.threads <= cpus, "threads", f"<= {cpus} (the CPUs this process may use)")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def level(self) -> int:
        return self.pc_level if self.pc_level is not None else DEFAULT_PC_LEVEL[self.optimizer]

    @property
    def name(self) -> str:
        pc = f"pc{self.level}" if self.pc else "nopc"
        return f"{self.preset}-{self.optimizer}-{pc}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    log_dir: Path
    steps: int  # optimizer steps completed
    final_checkpoint: Path | None
    val_bpb: float  # last validation bits per byte (nan if none ran)
    train_loss: float  # last training loss, nats/byte
    wall_s: float  # wall time of this invocation (data loading included)
    diverged: bool  # stopped on a non-finite loss or gradient
    # Ran every step but ended in a loss spike it did not recover from (_loss_diverged).
    loss_diverged: bool = False

    @property
    def failed(self) -> bool:
        """Exit status 1: the run diverged either way."""
        return self.diverged or self.loss_diverged


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_threads() -> int:
    """Intra-op threads for this machine now: torch's default, minus the cores other
    processes keep busy (1-minute load average), at least 1.

    Why: on a shared machine, OpenMP threads that outnumber the free cores spin-wait on
    each other; on the 2-core CI box under load, 2 threads ran a step 3-10x slower than 1.
    """
    limit = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return limit
    return max(1, min(limit, round(limit - busy)))


def lr_factor(
    step: int,
    *,
    warmup: int,
    total: int,
    final_ratio: float,
    anchor: tuple[int, float] | None = None,
) -> float:
    """LR multiplier at optimizer step ``step`` (0-based).

    ``(step + 1) / warmup`` during warmup, then a cosine from 1 down to ``final_ratio``
    reached at ``step = total - 1``. With ``anchor = (a, f)`` (a resume that changed
    ``total`` at step ``a``), steps ``>= a`` follow a cosine from ``f`` (the factor the old
    schedule gave step ``a``) down to ``final_ratio`` at ``total - 1`` instead.
    """
    if anchor is not None and step >= anchor[0]:
        start, start_factor = anchor
        span = max(1, total - 1 - start)
        progress = min(1.0, (step - start) / span)
        return final_ratio + (start_factor - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _schedule_factor(cfg: TrainConfig, step: int) -> float:
    """:func:`lr_factor` of ``cfg``'s schedule (its resume anchor included) at ``step``."""
    anchor = (None if cfg.lr_anchor_step is None or cfg.lr_anchor_factor is None
              else (cfg.lr_anchor_step, cfg.lr_anchor_factor))
    return lr_factor(step, warmup=cfg.warmup, total=cfg.steps, final_ratio=cfg.final_lr_ratio,
                     anchor=anchor)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resumed_config(
    saved: Mapping[str, Any], given: Mapping[str, Any], *, step: int, source: Path
) -> TrainConfig:
    """The options of a resumed run: the checkpoint's, updated with the ``given`` ones.

    Options in :data:`RESUME_OVERRIDES` are applied (a new ``steps`` after warmup anchors
    the cosine at ``step``; a new ``lr`` is announced); any other given option must equal
    the checkpoint's value, otherwise :class:`CommandError` lists every difference.
    """
    given = {k: v for k, v in given.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"unknown training options {unknown}")
    saved = {k: v for k, v in saved.items() if k in fields}
    if isinstance(saved.get("threads"), int) and saved["threads"] > available_cpus():
        # Saved on a bigger machine: as many threads as there are CPUs here.
        console.print(f"--threads {saved['threads']} (from the checkpoint) capped to the "
                      f"{available_cpus()} CPUs available here")
        saved["threads"] = available_cpus()
    try:
        old = TrainConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"checkpoint {str(source)!r} holds invalid training options: {exc}"
                           ) from exc
    try:
        new = dataclasses.replace(old, **given)
    except ValueError as exc:
        raise CommandError(_as_flags(str(exc))) from exc

    def meaning(c: TrainConfig, k: str) -> Any:  # lr None is the optimizer's default, ...
        if k == "data":  # the same file, however it is named
            return os.path.realpath(c.data) if c.data is not None else None
        return c.peak_lr if k == "lr" else c.level if k == "pc_level" else getattr(c, k)

    differing = [f"{_flag(k)} (checkpoint: {meaning(old, k)!r}, given: {meaning(new, k)!r})"
                 for k in sorted(given)
                 if k not in RESUME_OVERRIDES and meaning(old, k) != meaning(new, k)]
    if differing:
        raise CommandError(
            f"cannot change on --resume of {str(source)!r}: {', '.join(differing)}; drop "
            f"them to continue the run, or start a fresh run (another --log-dir). Flags that "
            f"may change: {', '.join(_flag(k) for k in RESUME_OVERRIDES)}"
        )
    if "log_dir" not in given:
        new = dataclasses.replace(new, log_dir=str(_run_of(source)))
    if new.peak_lr != old.peak_lr:
        console.print(f"[yellow]warning:[/] --lr {new.peak_lr:g} replaces the checkpoint's peak "
                      f"LR {old.peak_lr:g}: the schedule continues at the new scale from step "
                      f"{step + 1}")
    if new.steps != old.steps and step >= old.warmup:
        # Rebuilding the cosine for the new total would jump the LR (10x seen); continue
        # it instead from the factor the old schedule gives this step.
        factor = _schedule_factor(old, step)
        new = dataclasses.replace(new, lr_anchor_step=step, lr_anchor_factor=factor)
        console.print(f"--steps {old.steps} -> {new.steps}: the LR cosine continues from "
                      f"{factor * new.peak_lr:.3g} at step {step + 1} down to "
                      f"{new.final_lr_ratio * new.peak_lr:.3g} at step {new.steps}")
    return new


def build_model(
    model_config: LlamaConfig | dict, *, pc: bool, pc_level: int
) -> tuple[nn.Module, Any]:
    """A Llama from its config, with PC layers applied when ``pc``; returns (model, handle)."""
    cfg = model_config if isinstance(model_config, LlamaConfig) else LlamaConfig(**model_config)
    model = Llama(cfg)
    handle = None
    if pc:
        from specopt.pc import apply_pc

        handle = apply_pc(model, level=pc_level)
    return model, handle


def _build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    from specopt.optim import build_optimizer

    # Data parallel: Muon splits its NS work across ranks (specopt.optim.distributed).
    extra = ({"distributed": muon_mode(cfg.parallel)}
             if cfg.optimizer == "muon" and cfg.parallel is not None else {})
    return build_optimizer(unwrap(model), cfg.optimizer, lr=cfg.peak_lr,
                           weight_decay=cfg.weight_decay, **extra)


def _apply_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, saved: Mapping[str, Any],
    step: int,
) -> None:
    """After loading a checkpoint's scheduler state: scale its base LRs to ``cfg``'s peak
    LR and set the LR of the next step (``step``, 0-based) from ``cfg``'s schedule, when
    the resume changed either; otherwise the restored values stand (bit-identical)."""
    old_lr = saved.get("lr") or DEFAULT_LR[cfg.optimizer]
    changed = (old_lr != cfg.peak_lr or saved.get("steps") != cfg.steps)
    if not changed:
        return
    scheduler.base_lrs = [lr * cfg.peak_lr / old_lr for lr in scheduler.base_lrs]
    factor = _schedule_factor(cfg, step)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor


def _unique(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... : never mix two fresh runs in one folder."""
    path, i = base, 2
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _resolve_log_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.log_dir) if cfg.log_dir is not None else _unique(Path("runs") / cfg.name)


#: Subfolder of ``checkpoints/`` where a rewind moves the newer checkpoints (+ step).
SUPERSEDED_PREFIX = "superseded_at_step_"
#: Lock file of a run folder, held (``flock``) while a ``specopt train`` writes there.
LOCK_FILE = ".specopt-train.lock"


def lock_run_folder(log_dir: Path) -> Any:
    """Hold ``log_dir``'s lock for as long as the returned file stays open (None where the
    OS has no ``flock``).

    Why: two trainings in one folder (the same command started twice, a ``--resume`` of a
    run still going) would delete each other's checkpoint temp files, purge each other's
    events and interleave checkpoints. The kernel drops the lock when the process dies
    (also on ``kill -9``), so no stale lock survives a crash.

    Raises:
        CommandError: another process holds the lock (its pid is named).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    path = log_dir / LOCK_FILE
    lock = open(path, "a+")  # held open for the run; the caller closes it
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise CommandError(f"--log-dir {str(log_dir)!r} is in use by another specopt train "
                           f"(pid {holder}); wait for it to finish, or use another --log-dir"
                           ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _run_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to (also one set aside by a rewind, in
    ``checkpoints/superseded_at_step_<n>/``; a loose file: its own folder)."""
    folder = checkpoint.parent
    if folder.name.startswith(SUPERSEDED_PREFIX) and folder.parent.name == CHECKPOINT_DIR:
        folder = folder.parent
    return folder.parent if folder.name == CHECKPOINT_DIR else folder


def _same_folder(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _find_checkpoint(path: Path) -> Path:
    """``path`` itself, or the newest checkpoint of a run folder."""
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        found = sorted(folder.glob("step_*.pt"))
        if found:
            return found[-1]
        if any(p.is_dir() and (p / ".metadata").is_file() for p in folder.glob("step_*")):
            raise CommandError(
                f"run {str(path)!r} holds only distributed checkpoints (step_*/ folders of a "
                "--ddp/--fsdp run): --resume of a distributed run is not supported yet; "
                "`specopt inspect` and `specopt merge` read them")
        if any(path.glob("events.out.tfevents.*")):
            raise CommandError(
                f"run {str(path)!r} stopped before its first checkpoint: nothing to resume; "
                f"run the same command without --resume and with --log-dir {path} to start "
                "it over in place")
        raise CommandError(f"no checkpoints (step_*.pt) in {str(folder)!r}")
    if path.exists():
        raise CommandError(f"--resume path {str(path)!r} is not a regular file or folder "
                           "(a device, FIFO or socket)")
    raise CommandError(f"--resume path {str(path)!r} does not exist")


def _set_aside_newer_checkpoints(folder: Path, step: int) -> Path | None:
    """Move the checkpoints of ``folder`` newer than ``step`` into a subfolder; returns it.

    Why: a resume from an older checkpoint of the same run rewinds it (the writer purges
    what was logged after ``step``), so newer checkpoints belong to the abandoned
    continuation; left in place, the next ``--resume RUN`` would pick one of them and
    mix two timelines. Moved, not deleted: nothing is lost.
    """
    newer = [p for p in sorted(folder.glob("step_*.pt"))
             if (n := p.stem.removeprefix("step_")).isdigit() and int(n) > step]
    if not newer:
        return None
    aside = _unique(folder / f"{SUPERSEDED_PREFIX}{step:07d}")
    aside.mkdir(parents=True)
    for p in newer:
        os.replace(p, aside / p.name)
    return aside


def _restore(
    ckpt: dict[str, Any], path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, sampler: BatchSampler,
) -> None:
    """Load a training checkpoint into the live objects; every misfit is a CommandError
    naming the file and the part (nothing is half-loaded into the model)."""
    source = str(path)
    try:
        load_module_state(unwrap(model), ckpt["model"], source=source)
        names = {p: n for n, p in unwrap(model).named_parameters()}
        check_optimizer_state(optimizer, ckpt["optimizer"], names=names, source=source)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from exc
    for part, load in (("optimizer", optimizer.load_state_dict),
                       ("scheduler", scheduler.load_state_dict),
                       ("data", sampler.load_state_dict), ("rng", restore_rng_state)):
        try:
            load(ckpt[part])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CommandError(f"checkpoint {source!r}: cannot restore its {part!r} state: "
                               f"{type(exc).__name__}: {exc}") from exc


def _sort_after_existing_event_files(log_dir: Path) -> None:
    """Wait (< 1 s) until a new event file's name sorts after those in ``log_dir``.

    TensorBoard reads a folder's event files in name order, and a name starts with the
    creation second (``events.out.tfevents.<unix s>.<host>.<pid>.<n>``): a resume within
    the same second as its checkpoint's writer could be read *before* it, and its purge
    would then hide the wrong steps.
    """
    seconds = [int(part) for p in log_dir.glob("events.out.tfevents.*")
               if (part := p.name.split(".")[3]).isdigit()]
    delay = max(seconds, default=0) + 1 - time.time()
    if 0 < delay <= 1:
        time.sleep(delay)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[torch.Tensor], *, autocast: torch.dtype | None = None
) -> float:
    """Mean validation loss in nats per byte over fixed windows (model in eval mode), on
    the model's device, under ``autocast`` when given (e.g. ``torch.bfloat16``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for w in batches:
        w = w.to(device)
        with _autocast(device, autocast):
            total += float(model.loss(w[:, :-1], w[:, 1:])) * w.shape[0]
        count += w.shape[0]
    model.train(was_training)
    return total / count


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``"cpu"``, ``"cuda"`` (this rank's GPU under torchrun: ``LOCAL_RANK``)
    or ``"auto"`` (cuda when available).

    Raises:
        CommandError: ``"cuda"`` without a usable GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available "
                           "(torch.cuda.is_available() is False); use --device cpu or auto")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


class _NullMonitor:
    """Stands in for SpectralMonitor under --no-monitor, so the loop never branches."""

    def step(self, global_step: int, **kwargs: Any) -> None:
        return None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("step {task.completed:>5.0f}/{task.total:.0f}"),
        BarColumn(bar_width=24),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("cond {task.fields[cond]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


@contextlib.contextmanager
def _closing(*closeables: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for c in closeables:
            c.close()


@contextlib.contextmanager
def _alarms_above_the_bar() -> Iterator[None]:
    """Print the monitor's alarm warnings through the rich console (above the progress
    bar instead of through it), unless the user configured logging themselves."""
    logger = logging.getLogger("specopt.spectral.alarms")
    if logger.handlers or logging.getLogger().handlers:
        yield
        return
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def train(
    cfg: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    corpus: Corpus | None = None,
) -> TrainResult:
    """Run one training run (``cfg``) or resume one; returns where it logged and its
    final numbers.

    Args:
        cfg: options of a fresh run; must be None with ``resume``.
        resume: a checkpoint file, or a run folder (its newest checkpoint). The run's
            options come from the checkpoint, updated with ``overrides``.
        overrides: options given for the resume: those in :data:`RESUME_OVERRIDES` are
            applied (a larger ``steps`` extends the run, continuing the cosine from the
            current LR; ``log_dir`` defaults to the checkpoint's run); any other must equal
            the checkpoint's value or the resume is refused (:class:`CommandError`).
        progress: show the rich progress bar.
        corpus: an already loaded corpus to use instead of loading ``cfg.data`` (studies
            that run many configurations in one process load it once).
    """
    if (cfg is None) == (resume is None):
        raise ValueError("give exactly one of cfg (fresh run) or resume (checkpoint)")
    from torch.utils.tensorboard import SummaryWriter

    t_start = time.perf_counter()
    ckpt: dict[str, Any] | None = None
    if resume is not None:
        ckpt_path = _find_checkpoint(Path(resume))
        try:
            ckpt = load_checkpoint(ckpt_path, require=TRAINING_KEYS)
        except (ValueError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from exc
        refuse_nonfinite(ckpt["model"], ckpt_path, action="resume from it")
        saved = ckpt["config"]
        if not (isinstance(saved, dict) and all(isinstance(saved.get(k), dict)
                                                for k in ("train", "model"))):
            raise CommandError(f"checkpoint {str(ckpt_path)!r}: 'config' lacks the 'train' "
                               "and 'model' option dicts")
        cfg = _resumed_config(saved["train"], overrides or {}, step=ckpt["step"],
                              source=ckpt_path)
        if ckpt["step"] >= cfg.steps:
            raise CommandError(
                f"checkpoint {str(ckpt_path)!r} is at step {ckpt['step']}, already >= --steps "
                f"{cfg.steps}; pass a larger --steps to continue"
            )
        try:
            model_cfg = LlamaConfig(**saved["model"])
        except (TypeError, ValueError) as exc:
            raise CommandError(f"checkpoint {str(ckpt_path)!r}: invalid model config: {exc}"
                               ) from exc
    else:
        model_cfg = PRESETS[cfg.preset]
        if cfg.data is not None:  # saved absolute: a resume from another folder reads it too
            cfg = dataclasses.replace(cfg, data=os.path.abspath(os.path.expanduser(cfg.data)))
    if cfg.seq_len > model_cfg.max_seq_len:
        raise CommandError(f"--seq-len must be <= {model_cfg.max_seq_len}, the {cfg.preset} "
                           f"model's context (max_seq_len), got {cfg.seq_len}")
    device = resolve_device(cfg.device)
    autocast = DTYPES[cfg.dtype]
    if cfg.parallel is not None:
        if ckpt is not None:
            raise CommandError("--resume is not supported with --ddp/--fsdp yet")
        try:
            init_from_env(backend="nccl" if device.type == "cuda" else "gloo")
        except RuntimeError as exc:
            raise CommandError(f"--{cfg.parallel}: {exc}") from exc
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not is_main_process():
            console.quiet = True  # rank 0 alone prints
    # Rank 0 decides (and checks) the folder before anyone writes: ranks must agree.
    log_dir = Path(broadcast_object(str(_resolve_log_dir(cfg))))
    if log_dir.exists() and not log_dir.is_dir():
        raise CommandError(f"--log-dir {str(log_dir)!r} is a file, not a folder")
    has_events = any(log_dir.glob("events.out.tfevents.*"))
    has_checkpoints = any((log_dir / CHECKPOINT_DIR).glob("step_*"))
    if broadcast_object(ckpt is None and has_events and has_checkpoints):
        raise CommandError(
            f"log dir {str(log_dir)!r} already holds a run; pass --resume {log_dir} to continue "
            "it, or another --log-dir"
        )
    if broadcast_object(ckpt is not None and (has_events or has_checkpoints)
                        and not _same_folder(log_dir, _run_of(ckpt_path))):
        # Its purge and checkpoints would interleave two runs in one folder.
        raise CommandError(
            f"--log-dir {str(log_dir)!r} already holds another run; resume into the "
            f"checkpoint's own run ({str(_run_of(ckpt_path))!r}, the default) or an empty "
            "--log-dir")
    restart = ckpt is None and has_events  # stopped before its first checkpoint
    if cfg.threads == 0:  # resolved once and saved, so a resume uses the same count
        cfg = dataclasses.replace(cfg, threads=auto_threads())
    torch.set_num_threads(cfg.threads)

    try:
        if corpus is None:
            corpus = load_corpus(cfg.data, max_bytes=cfg.max_data_bytes)
        sampler = BatchSampler(corpus.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                               seed=cfg.seed + get_rank())  # data parallel: own batches
        val_batches = eval_windows(corpus.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                   max_batches=cfg.eval_batches)
    except DataError as exc:
        raise CommandError(str(exc)) from exc

    torch.manual_seed(cfg.seed)
    model, pc_handle = build_model(model_cfg, pc=cfg.pc, pc_level=cfg.level)
    model.to(device)  # PC buffers (u, v) move with it
    if cfg.parallel is not None:
        model = wrap_model(model, cfg.parallel)
    optimizer = _build_optimizer(model, cfg)
    if pc_handle is not None:
        pc_handle.attach(optimizer)
    schedule = cfg  # the schedule is fixed here, whatever cfg is rebound to later
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule_factor(schedule, s))
    start_step = 0
    if ckpt is not None:
        _restore(ckpt, ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler,
                 sampler=sampler)
        _apply_schedule(scheduler, cfg, ckpt["config"]["train"], ckpt["step"])
        start_step = ckpt["step"]

    run_lock, refusal = None, None
    if is_main_process():
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            # Before anything that deletes or purges: another process may be writing here.
            run_lock = lock_run_folder(log_dir)
        except OSError as exc:
            refusal = f"cannot create --log-dir {str(log_dir)!r}: {exc.strerror or exc}"
        except CommandError as exc:
            refusal = str(exc)
    refusal = broadcast_object(refusal)  # every rank stops, not rank 0 alone (no hang)
    if refusal is not None:
        raise CommandError(refusal)
    if is_main_process():
        if resume is not None and Path(resume).is_dir() and \
                _find_checkpoint(Path(resume)) != ckpt_path:
            raise CommandError(
                f"run {str(resume)!r} got a newer checkpoint while this resume started (a "
                f"training of it was still running and has ended); run the command again")
        for stale in remove_stale_temp_files(log_dir / CHECKPOINT_DIR, "step_*"):
            console.print(f"removed {escape(str(stale))} (an interrupted checkpoint write)")
        if ckpt is not None:
            aside = _set_aside_newer_checkpoints(log_dir / CHECKPOINT_DIR, start_step)
            if aside is not None:
                console.print(f"resuming from step {start_step} rewinds the run: its newer "
                              f"checkpoints were moved to {escape(str(aside))}")
    if restart:
        console.print(f"log dir {escape(str(log_dir))} holds a run that stopped before its "
                      "first checkpoint: starting it over in place")
    if ckpt is not None or restart:
        _sort_after_existing_event_files(log_dir)
    # purge_step: a resumed run hides what the crashed run logged *after* its checkpoint
    # (steps > start_step; TensorBoard purges steps >= purge_step). The checkpoint step
    # itself was logged before the checkpoint was written (see flush() below): it stays.
    # A restart in place hides everything the stopped run logged.
    purge_step = start_step + 1 if ckpt is not None else 0 if restart else None
    try:
        writer = NullWriter.for_rank(lambda: SummaryWriter(
            str(log_dir), purge_step=purge_step, max_queue=1000, flush_secs=10))
    except OSError as exc:
        raise CommandError(f"cannot write TensorBoard events in --log-dir {str(log_dir)!r}: "
                           f"{exc.strerror or exc}") from exc
    if cfg.monitor:
        from specopt.spectral.monitor import SpectralMonitor

        # One writer for the trainer and the monitor: one event file per (re)start.
        # Called by hand after optimizer.step() (not attached) so the loop gets the snapshot
        # back for the progress bar; same numbers as attach().
        monitor: Any = SpectralMonitor(unwrap(model), writer=writer, every=cfg.monitor_every,
                                       budget=cfg.monitor_budget or None, start_step=start_step,
                                       loss_tags=("train/loss", "val/loss"))  # charted first
    else:
        monitor = _NullMonitor()
    if start_step == 0:
        writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", 0)

    n_params = sum(p.numel() for p in unwrap(model).parameters())
    console.print(
        f"[bold]specopt train[/] {cfg.name}: {n_params:,} parameters, optimizer {cfg.optimizer} "
        f"(lr {cfg.peak_lr:g}), PC {'level ' + str(cfg.level) if cfg.pc else 'off'}, "
        f"{cfg.threads} thread(s), {corpus.describe()}"
    )
    if ckpt is not None:
        console.print(f"resumed from step {start_step}")

    def checkpoint_distributed(step: int) -> Path:
        folder = log_dir / CHECKPOINT_DIR
        path = save_distributed_checkpoint(
            folder / f"step_{step:07d}", unwrap(model), optimizer,
            extra={"step": step, "scheduler": scheduler.state_dict(),
                   "config": {"train": cfg.to_dict(), "model": model_cfg.to_dict(),
                              "pc": cfg.pc, "pc_level": cfg.level if cfg.pc else None}})
        if is_main_process() and cfg.keep_checkpoints:
            import shutil

            for old in sorted(folder.glob("step_*"))[: -cfg.keep_checkpoints]:
                if old != path and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
        return path

    def checkpoint(step: int) -> Path:
        if cfg.parallel is not None:
            return checkpoint_distributed(step)
        payload = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(),
            "data": sampler.state_dict(),
            "config": {"train": cfg.to_dict(), "model": model_cfg.to_dict(), "pc": cfg.pc,
                       "pc_level": cfg.level if cfg.pc else None},
        }
        target = log_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt"
        try:
            path = save_checkpoint(target, payload)
        except OSError as exc:  # disk full, unwritable: atomic_write left nothing behind
            raise CommandError(
                f"cannot write checkpoint {str(target)!r}: {exc.strerror or exc}; no partial "
                f"file was left, the newest complete checkpoint is "
                f"{str(last_ckpt) if last_ckpt else 'none'}") from exc
        old = sorted((log_dir / CHECKPOINT_DIR).glob("step_*.pt"))[: -cfg.keep_checkpoints or None]
        for p in old if cfg.keep_checkpoints else []:
            if p != path:
                p.unlink(missing_ok=True)
        return path

    tokens_per_step = cfg.batch_size * cfg.seq_len
    loss_val, val_bpb, tps, cond, diverged = math.nan, math.nan, math.nan, math.nan, False
    losses: list[tuple[int, float]] = []  # (step, train loss) of this invocation
    last_ckpt: Path | None = None
    step = start_step
    model.train()
    # _closing: monitor and writer are closed (what was logged reaches the disk) also when
    # the loop ends in an error, e.g. a checkpoint that cannot be written.
    with _progress(progress and is_main_process()) as bar, _alarms_above_the_bar(), \
            _closing(monitor, writer, *([run_lock] if run_lock is not None else [])):
        task = bar.add_task("train", total=cfg.steps, completed=start_step, loss="-", lr="-",
                            tps="-", cond="-")
        t_last = time.perf_counter()
        while step < cfg.steps:
            x, y = (t.to(device, non_blocking=True) for t in next(sampler))
            with _autocast(device, autocast):  # backward outside: autocast covers forward
                loss = train_loss(model, x, y)
            # One host sync: under --ddp/--fsdp the global-batch loss (same on every rank).
            loss_val = float(loss.detach() if cfg.parallel is None
                             else _mean_over_ranks(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            if cfg.parallel is not None:  # FSDP2 DTensor + plain grads; a global norm
                grad_norm = clip_grad_norm_(unwrap(model).parameters(), max_norm)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                # Never step on a non-finite gradient: weights stay as they were. Logged at
                # the step it would have made (train/loss at s drives step s), not at
                # `step`, which already holds the last finite loss.
                writer.add_scalar("train/loss", loss_val, step + 1)
                diverged = True
                console.print(
                    f"[bold red]loss {loss_val} / grad norm {grad_norm} is non-finite at step "
                    f"{step + 1}: stopping without an optimizer step.[/] Run `specopt diagnose "
                    f"{log_dir}` to see which layers went first."
                )
                break
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            inst = tokens_per_step / max(now - t_last, 1e-9)
            tps = inst if math.isnan(tps) else 0.9 * tps + 0.1 * inst
            t_last = now
            writer.add_scalar("train/loss", loss_val, step)
            losses.append((step, loss_val))
            writer.add_scalar("train/lr", lr_now, step)
            writer.add_scalar("train/grad_norm", grad_norm, step)
            writer.add_scalar("perf/tokens_per_s", inst, step)
            snapshot = monitor.step(step, loss=loss_val)
            if snapshot is not None:
                cond = snapshot.aggregates.get("condition_number_max", math.nan)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                val_loss = evaluate(unwrap(model), val_batches, autocast=autocast)
                val_bpb = bits_per_byte(val_loss)
                writer.add_scalar("val/loss", val_loss, step)
                writer.add_scalar("val/bpb", val_bpb, step)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                # Events up to this step reach the disk before the checkpoint does: a run
                # killed later resumes here and relies on them being there (logged once).
                monitor.flush()
                writer.flush()
                last_ckpt = checkpoint(step)
            bar.update(task, completed=step, loss=f"{loss_val:.3f}", lr=f"{lr_now:.2e}",
                       tps=f"{tps:,.0f}", cond="-" if math.isnan(cond) else f"{cond:.3g}")
            t_last = time.perf_counter()  # eval/checkpoint time is not training throughput
    wall = time.perf_counter() - t_start
    loss_diverged = not diverged and _loss_diverged(losses)
    if loss_diverged:
        console.print(f"[bold red]the loss diverged: {losses[0][1]:.3g} at step {losses[0][0]}, "
                      f"{loss_val:.3g} at step {step}.[/] Run `specopt diagnose {log_dir}` to "
                      "see which layers went first.")
    if not math.isnan(val_bpb):
        console.print(
            f"final validation: {val_bpb:.4f} bits/byte after {step} steps ({wall:.1f} s)"
        )
    console.print(f"logs and checkpoints: [bold]{escape(str(log_dir))}[/]")
    console.print(f"view them:  tensorboard --logdir {escape(str(log_dir))}")
    return TrainResult(log_dir, step, last_ckpt, val_bpb, loss_val, wall, diverged,
                       loss_diverged)


def _loss_diverged(losses: list[tuple[int, float]]) -> bool:
    """``specopt diagnose``'s rule (:func:`~specopt.cli.diagnose.ended_diverged`) on the
    training losses of this invocation: the run ends in a loss spike it did not recover
    from. Such a run exits 1, not 0, although every step ran."""
    import numpy as np

    from specopt.cli.diagnose import detect_spikes, ended_diverged

    steps = np.array([s for s, _ in losses], dtype=np.int64)
    values = np.array([v for _, v in losses], dtype=np.float64)
    return ended_diverged(steps, values, detect_spikes(steps, values))


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = x.float().clone()
    dist.all_reduce(x)  # gloo has no AVG: sum, then divide
    return x / dist.get_world_size()


# ---------------------------------------------------------------- command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a small Llama on the embedded corpus (Muon/AdamW, PC layer, monitor)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default=None,
                   help=f"muon: Muon on hidden matrices, AdamW on the rest (default: "
                   f"{d.optimizer})")
    p.add_argument("--pc", action=argparse.BooleanOptionalAction, default=None,
                   help="PC layer on FFN and attention-output weights (default: on)")
    p.add_argument("--pc-level", type=int, default=None,
                   help="PC polynomial level 1-4 (default: 2 for muon, 4 for adamw)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"model size (default: {d.preset})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per step (default: {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"bytes per sequence (default: {d.seq_len})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: {DEFAULT_LR})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"linear warmup steps, then cosine to 0.1x (default: {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"decoupled weight decay of matrices (default: {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, default=None,
                   help=f"max global gradient norm, 0 disables (default: {d.grad_clip})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"model init and batch order (default: {d.seed})")
    p.add_argument("--log-dir", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help=f"checkpoint interval in steps, 0: final only (default: {d.ckpt_every})")
    p.add_argument("--keep-checkpoints", type=int, default=None,
                   help=f"newest step checkpoints kept (default: {d.keep_checkpoints})")
    p.add_argument("--resume", default=None, metavar="CKPT_OR_RUN",
                   help="continue from a checkpoint file or a run folder's newest checkpoint; "
                   "options come from the checkpoint; these may be given to change them: "
                   f"{', '.join(_flag(k) for k in RESUME_OVERRIDES)} (a new --steps continues "
                   "the cosine from the current LR); any other flag must match the checkpoint")
    p.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=None,
                   help="spectral monitor (default: on)")
    p.add_argument("--monitor-every", type=int, default=None,
                   help=f"spectral snapshot cadence in steps (default: {d.monitor_every})")
    p.add_argument("--monitor-budget", type=float, default=None,
                   help="monitor time / step time above which snapshots thin out, 0: never "
                   f"(default: {d.monitor_budget}; 0 when --monitor-every is given)")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"validation interval, 0: only at the end (default: {d.eval_every})")
    p.add_argument("--eval-batches", type=int, default=None,
                   help=f"validation batches per evaluation (default: {d.eval_batches})")
    p.add_argument("--data", default=None, help="text file or folder (default: Python stdlib)")
    p.add_argument("--compare", action="store_true",
                   help="run without and with the PC layer back to back, then compare them")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; 0: auto, the cores not busy with other work (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help=f"where to train: cpu, cuda (under torchrun: LOCAL_RANK's GPU) or auto, "
                   f"cuda when available (default: {d.device})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="bf16: autocast forward and loss to bfloat16, weights and optimizer "
                   f"state stay fp32 (default: {d.dtype})")
    par = p.add_mutually_exclusive_group()
    par.add_argument("--ddp", dest="parallel", action="store_const", const="ddp", default=None,
                     help="data parallel with DDP (launch with torchrun; --batch-size per rank)")
    par.add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp",
                     help="data parallel with FSDP2 sharding (launch with torchrun)")
    p.set_defaults(func=run)


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options given on the command line (every flag defaults to None, so a
    resume can tell "not given" from "given, equal to the default")."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "monitor_every" in given and "monitor_budget" not in given:
        given["monitor_budget"] = 0.0  # an explicit --monitor-every is honoured as given
    return given


def _as_flags(message: str) -> str:
    """A TrainConfig message in CLI words: ``seq_len`` -> ``--seq-len``."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} | {"no_pc"}
    return re.sub(r"\b[a-z]+(?:_[a-z]+)*\b",
                  lambda m: _flag(m.group()) if m.group() in fields else m.group(), message)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    try:
        return TrainConfig(**_given_options(args))
    except ValueError as exc:
        raise CommandError(_as_flags(str(exc))) from exc


def run(args: argparse.Namespace) -> int:
    if getattr(args, "parallel", None) and (args.resume or args.compare):
        raise CommandError("--ddp/--fsdp cannot be combined with --resume or --compare yet")
    if args.resume and args.compare:
        raise CommandError("--compare starts two fresh runs; it cannot be combined with --resume")
    if args.resume:
        result = train(resume=args.resume, overrides=_given_options(args),
                       progress=not args.no_progress)
        return 1 if result.failed else 0
    cfg = _config_from_args(args)
    if not args.compare:
        try:
            result = train(cfg, progress=not args.no_progress)
        finally:
            if cfg.parallel is not None:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
        return 1 if result.failed else 0
    from specopt.cli.compare import compare_runs

    root = Path(cfg.log_dir) if cfg.log_dir else _unique(
        Path("runs") / f"{cfg.preset}-{cfg.optimizer}-compare-s{cfg.seed}")
    results = []
    for pc in (False, True):
        sub = dataclasses.replace(cfg, pc=pc, pc_level=cfg.pc_level if pc else None,
                                  log_dir=str(root / ("pc" if pc else "baseline")))
        console.rule(f"{'PC layer' if pc else 'baseline'} run")
        results.append(train(sub, progress=not args.no_progress))
    compare_runs([r.log_dir for r in results], out=root / "compare.png")
    return 1 if any(r.failed for r in results) else 0
