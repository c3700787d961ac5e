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
on any world size (``--resume`` of a distributed run is not supported yet).

Resume restores model (incl. PC buffers), optimizer, scheduler, RNG and sampler state,
so ``N`` straight steps and ``N/2 + resume + N/2`` give bit-identical parameters.
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
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from specopt.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from specopt.cli._console import CommandError, console
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
    "RESUME_OVERRIDES",
    "TrainConfig",
    "TrainResult",
    "add_parser",
    "auto_threads",
    "build_model",
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
#: Options that may differ when resuming (the rest come from the checkpoint).
RESUME_OVERRIDES = ("steps", "log_dir", "ckpt_every", "keep_checkpoints", "eval_every", "monitor",
                    "monitor_every", "monitor_budget")


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

    def __post_init__(self) -> None:
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "monitor_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "ckpt_every", "eval_every", "keep_checkpoints", "seed", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.monitor_budget <= 1.0:
            raise ValueError(f"monitor_budget must be in [0, 1], got {self.monitor_budget}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.parallel not in (None, "ddp", "fsdp"):
            raise ValueError(f"parallel must be None, 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.pc_level is not None and self.pc_level <= 0:
            raise ValueError(f"pc_level must be positive, got {self.pc_level}")

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
    diverged: bool


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


def lr_factor(step: int, *, warmup: int, total: int, final_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based).

    ``(step + 1) / warmup`` during warmup, then a cosine from 1 down to ``final_ratio``
    reached at ``step = total - 1``.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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


def _unique(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... : never mix two fresh runs in one folder."""
    path, i = base, 2
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _resolve_log_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.log_dir) if cfg.log_dir is not None else _unique(Path("runs") / cfg.name)


def _find_checkpoint(path: Path) -> Path:
    """``path`` itself, or the newest checkpoint of a run folder."""
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        found = sorted(folder.glob("step_*.pt"))
        if found:
            return found[-1]
        raise CommandError(f"no checkpoints (step_*.pt) in {str(folder)!r}")
    raise CommandError(f"--resume path {str(path)!r} does not exist")


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean validation loss in nats per byte over fixed windows (model in eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for w in batches:
        total += float(model.loss(w[:, :-1], w[:, 1:])) * w.shape[0]
        count += w.shape[0]
    model.train(was_training)
    return total / count


class _NullMonitor:
    """Stands in for SpectralMonitor under --no-monitor, so the loop never branches."""

    def step(self, global_step: int, **kwargs: Any) -> None:
        return None

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
        overrides: options changed on resume, among :data:`RESUME_OVERRIDES` (e.g. a
            larger ``steps`` extends the run; ``log_dir`` defaults to the checkpoint's run).
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
            ckpt = load_checkpoint(ckpt_path)
        except (ValueError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from exc
        saved = dict(ckpt["config"]["train"])
        bad = sorted(set(overrides or {}) - set(RESUME_OVERRIDES))
        if bad:
            raise CommandError(f"options {bad} cannot change on resume (only {RESUME_OVERRIDES})")
        saved["log_dir"] = str(ckpt_path.parent.parent)
        saved.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            cfg = TrainConfig(**saved)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if ckpt["step"] >= cfg.steps:
            raise CommandError(
                f"checkpoint {str(ckpt_path)!r} is at step {ckpt['step']}, already >= --steps "
                f"{cfg.steps}; pass a larger --steps to continue"
            )
    if cfg.parallel is not None:
        if ckpt is not None:
            raise CommandError("--resume is not supported with --ddp/--fsdp yet")
        init_from_env()
        if not is_main_process():
            console.quiet = True  # rank 0 alone prints
    # Rank 0 decides (and checks) the folder before anyone writes: ranks must agree.
    log_dir = Path(broadcast_object(str(_resolve_log_dir(cfg))))
    if broadcast_object(ckpt is None and any(log_dir.glob("events.out.tfevents.*"))):
        raise CommandError(
            f"log dir {str(log_dir)!r} already holds a run; pass --resume {log_dir} to continue "
            "it, or another --log-dir"
        )
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
    if ckpt is not None:
        model_cfg = LlamaConfig(**ckpt["config"]["model"])
    else:
        base = PRESETS[cfg.preset]
        model_cfg = dataclasses.replace(base, max_seq_len=max(base.max_seq_len, cfg.seq_len))
    model, pc_handle = build_model(model_cfg, pc=cfg.pc, pc_level=cfg.level)
    if cfg.parallel is not None:
        model = wrap_model(model, cfg.parallel)
    optimizer = _build_optimizer(model, cfg)
    if pc_handle is not None:
        pc_handle.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup=cfg.warmup, total=cfg.steps, final_ratio=cfg.final_lr_ratio),
    )
    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sampler.load_state_dict(ckpt["data"])
        restore_rng_state(ckpt["rng"])
        start_step = int(ckpt["step"])

    log_dir.mkdir(parents=True, exist_ok=True)
    # purge_step: a resumed run hides what the crashed run logged after its checkpoint.
    writer = NullWriter.for_rank(lambda: SummaryWriter(
        str(log_dir), purge_step=start_step if ckpt else None, max_queue=1000, flush_secs=10))
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
        path = save_checkpoint(log_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt", payload)
        old = sorted((log_dir / CHECKPOINT_DIR).glob("step_*.pt"))[: -cfg.keep_checkpoints or None]
        for p in old if cfg.keep_checkpoints else []:
            if p != path:
                p.unlink(missing_ok=True)
        return path

    tokens_per_step = cfg.batch_size * cfg.seq_len
    loss_val, val_bpb, tps, cond, diverged = math.nan, math.nan, math.nan, math.nan, False
    last_ckpt: Path | None = None
    step = start_step
    model.train()
    with _progress(progress and is_main_process()) as bar, _alarms_above_the_bar():
        task = bar.add_task("train", total=cfg.steps, completed=start_step, loss="-", lr="-",
                            tps="-", cond="-")
        t_last = time.perf_counter()
        while step < cfg.steps:
            x, y = next(sampler)
            loss = train_loss(model, x, y)
            loss_val = float(loss.detach())
            if cfg.parallel is not None:  # log the global-batch loss; same on every rank
                loss_val = float(_mean_over_ranks(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            if cfg.parallel is not None:  # FSDP2 DTensor + plain grads; a global norm
                grad_norm = clip_grad_norm_(unwrap(model).parameters(), max_norm)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                # Never step on a non-finite gradient: weights stay as they were.
                writer.add_scalar("train/loss", loss_val, step)
                diverged = True
                console.print(
                    f"[bold red]loss {loss_val} / grad norm {grad_norm} is non-finite at step "
                    f"{step}: stopping without an optimizer step.[/] Run `specopt diagnose "
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
            writer.add_scalar("train/lr", lr_now, step)
            writer.add_scalar("train/grad_norm", grad_norm, step)
            writer.add_scalar("perf/tokens_per_s", inst, step)
            snapshot = monitor.step(step, loss=loss_val)
            if snapshot is not None:
                cond = snapshot.aggregates.get("condition_number_max", math.nan)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                val_loss = evaluate(unwrap(model), val_batches)
                val_bpb = bits_per_byte(val_loss)
                writer.add_scalar("val/loss", val_loss, step)
                writer.add_scalar("val/bpb", val_bpb, step)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                last_ckpt = checkpoint(step)
            bar.update(task, completed=step, loss=f"{loss_val:.3f}", lr=f"{lr_now:.2e}",
                       tps=f"{tps:,.0f}", cond="-" if math.isnan(cond) else f"{cond:.3g}")
            t_last = time.perf_counter()  # eval/checkpoint time is not training throughput
    monitor.close()
    writer.close()
    wall = time.perf_counter() - t_start
    if not math.isnan(val_bpb):
        console.print(
            f"final validation: {val_bpb:.4f} bits/byte after {step} steps ({wall:.1f} s)"
        )
    console.print(f"logs and checkpoints: [bold]{escape(str(log_dir))}[/]")
    console.print(f"view them:  tensorboard --logdir {escape(str(log_dir))}")
    return TrainResult(log_dir, step, last_ckpt, val_bpb, loss_val, wall, diverged)


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
    p.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default=d.optimizer,
                   help=f"muon: Muon on hidden matrices, AdamW on the rest (default: "
                   f"{d.optimizer})")
    p.add_argument("--pc", action=argparse.BooleanOptionalAction, default=d.pc,
                   help="PC layer on FFN and attention-output weights (default: on)")
    p.add_argument("--pc-level", type=int, default=None,
                   help="PC polynomial level 1-4 (default: 2 for muon, 4 for adamw)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset,
                   help=f"model size (default: {d.preset})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"sequences per step (default: {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help=f"bytes per sequence (default: {d.seq_len})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: {DEFAULT_LR})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"linear warmup steps, then cosine to 0.1x (default: {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"decoupled weight decay of matrices (default: {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"max global gradient norm, 0 disables (default: {d.grad_clip})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"model init and batch order (default: {d.seed})")
    p.add_argument("--log-dir", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help=f"checkpoint interval in steps, 0: final only (default: {d.ckpt_every})")
    p.add_argument("--keep-checkpoints", type=int, default=None,
                   help=f"newest step checkpoints kept (default: {d.keep_checkpoints})")
    p.add_argument("--resume", default=None, metavar="CKPT_OR_RUN",
                   help="continue from a checkpoint file or a run folder's newest checkpoint; "
                   f"options come from the checkpoint except {', '.join(RESUME_OVERRIDES)}")
    p.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=None,
                   help="spectral monitor (default: on)")
    p.add_argument("--monitor-every", type=int, default=None,
                   help=f"spectral snapshot cadence in steps (default: {d.monitor_every})")
    p.add_argument("--monitor-budget", type=float, default=None,
                   help="monitor time / step time above which snapshots thin out, 0: never "
                   f"(default: {d.monitor_budget}; 0 when --monitor-every is given)")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"validation interval, 0: only at the end (default: {d.eval_every})")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help=f"validation batches per evaluation (default: {d.eval_batches})")
    p.add_argument("--data", default=None, help="text file or folder (default: Python stdlib)")
    p.add_argument("--compare", action="store_true",
                   help="run without and with the PC layer back to back, then compare them")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads; 0: auto, the cores not busy with other work (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    par = p.add_mutually_exclusive_group()
    par.add_argument("--ddp", dest="parallel", action="store_const", const="ddp", default=None,
                     help="data parallel with DDP (launch with torchrun; --batch-size per rank)")
    par.add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp",
                     help="data parallel with FSDP2 sharding (launch with torchrun)")
    p.set_defaults(func=run)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # Resume-overridable flags default to None (so a resume can tell "not given").
    values = {k: v for k, v in vars(args).items()
              if k in fields and not (v is None and k in RESUME_OVERRIDES)}
    if values.get("monitor_every") is not None and values.get("monitor_budget") is None:
        values["monitor_budget"] = 0.0  # an explicit --monitor-every is honoured as given
    try:
        return TrainConfig(**values)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    if getattr(args, "parallel", None) and (args.resume or args.compare):
        raise CommandError("--ddp/--fsdp cannot be combined with --resume or --compare yet")
    if args.resume and args.compare:
        raise CommandError("--compare starts two fresh runs; it cannot be combined with --resume")
    if args.resume:
        overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if getattr(args, k) is not None}
        result = train(resume=args.resume, overrides=overrides, progress=not args.no_progress)
        return 1 if result.diverged else 0
    cfg = _config_from_args(args)
    if not args.compare:
        try:
            result = train(cfg, progress=not args.no_progress)
        finally:
            if cfg.parallel is not None:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
        return 1 if result.diverged else 0
    from specopt.cli.compare import compare_runs

    root = Path(cfg.log_dir) if cfg.log_dir else _unique(
        Path("runs") / f"{cfg.preset}-{cfg.optimizer}-compare-s{cfg.seed}")
    results = []
    for pc in (False, True):
        sub = dataclasses.replace(cfg, pc=pc, log_dir=str(root / ("pc" if pc else "baseline")))
        console.rule(f"{'PC layer' if pc else 'baseline'} run")
        results.append(train(sub, progress=not args.no_progress))
    compare_runs([r.log_dir for r in results], out=root / "compare.png")
    return 1 if any(r.diverged for r in results) else 0
