"""Test harness: run a function on N local processes with gloo, with hard timeouts.

``run_distributed(fn, world_size=2, args=(...))`` spawns ``world_size`` fresh Python
processes (``multiprocessing`` spawn context), each joining a gloo process group on
127.0.0.1 at a free TCP port, calls ``fn(rank, world_size, *args)`` and returns the
per-rank return values (which must be picklable). A worker's exception is re-raised in the
parent with its traceback. Hangs fail fast: collectives time out after
``collective_timeout`` seconds and the whole run is killed after ``timeout`` seconds, so a
deadlock fails one test instead of blocking CI.

``fn`` must be defined at module level in an importable module (spawn pickles it by name).
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    collective_timeout: float,
    results: Any,
) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # 2 ranks on a 2-core box: one thread each
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Bytes, not tensors: torch's queue would pass tensors through shared memory that
        # dies with this process.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int = 2,
    args: tuple = (),
    timeout: float = 120.0,
    collective_timeout: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes.

    Returns:
        ``[result_of_rank_0, result_of_rank_1, ...]``.

    Raises:
        RuntimeError: a worker raised (its traceback is in the message), died, or the
            run exceeded ``timeout`` seconds (all workers are then killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, collective_timeout, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got: dict[int, Any] = {}
    errors: list[str] = []
    try:
        while len(got) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"distributed run of {fn.__name__} timed out after {timeout:.0f} s "
                    f"(ranks finished: {sorted(got)}); errors so far: {errors}"
                )
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(0.5)  # let a last message arrive
                    if results.empty():
                        codes = [p.exitcode for p in procs]
                        raise RuntimeError(
                            f"a worker of {fn.__name__} died (exit codes {codes}); "
                            f"errors so far: {errors}"
                        ) from None
                continue
            if ok:
                got[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break  # the other ranks will hang in a collective: fail now
        if errors:
            raise RuntimeError(f"distributed run of {fn.__name__} failed:\n" + "\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=5 if not errors and len(got) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [got[r] for r in range(world_size)]
