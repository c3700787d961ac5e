"""``specopt inspect CHECKPOINT``: per-layer spectra of a weight file.

Reads a specopt checkpoint (the model is rebuilt, so PC layers report their *effective*
weight ``W_eff``), a plain PyTorch state_dict, or a ``.safetensors`` file (every 2-D
floating tensor, found by name). Metrics come from :mod:`specopt.spectral.metrics`
(exact ``svdvals``); prints a table (sigma_max, sigma_min, condition number, GMCN,
stable and effective rank, RMS->RMS norm) with the model-level geometric means, and
writes a PNG: singular-value distributions (``sigma / sigma_max``, log scale) and
condition numbers per layer.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape
from torch import Tensor, nn

from specopt.cli._console import CommandError, console, fmt
from specopt.cli._files import (
    check_input_file,
    check_output_path,
    checkpoint_model,
    is_distributed_checkpoint,
    load_weight_file,
    write_output,
)

__all__ = ["LayerSpectrum", "add_parser", "collect_matrices", "inspect_file", "run"]


@dataclass
class LayerSpectrum:
    name: str
    shape: tuple[int, int]
    pc: bool  # effective weight of a PC layer
    sigma: Tensor  # descending singular values (float64)
    metrics: dict[str, float]


def _model_matrices(ckpt: dict, path: str | Path) -> dict[str, tuple[Tensor, bool]]:
    """Effective weights of a specopt checkpoint's model, keyed by module path."""
    from specopt.pc import is_pc_module

    model = checkpoint_model(ckpt, path)
    out: dict[str, tuple[Tensor, bool]] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                out[name] = (module.weight.detach().clone(), is_pc_module(module))
    return out


def collect_matrices(path: str | Path) -> dict[str, tuple[Tensor, bool]]:
    """``{layer name: (2-D weight, is_pc)}`` from any supported weight file."""
    state, ckpt = load_weight_file(path)
    if ckpt is not None and isinstance(ckpt.get("config"), dict) and "model" in ckpt["config"]:
        return _model_matrices(ckpt, path)
    out = {}
    for key, t in state.items():
        if t.ndim == 2 and t.is_floating_point() and min(t.shape) > 1:
            # A raw PC weight saved in a plain state_dict is not what the layer applies.
            name = key.removesuffix(".weight")
            out[name] = (t, False)
    return out


def inspect_file(
    path: str | Path,
    *,
    match: str | None = None,
    png: str | Path | None = None,
    float64: bool = False,
) -> list[LayerSpectrum]:
    """Spectra and metrics of every matrix of ``path`` whose name matches ``match``.

    Prints the table; writes the histogram PNG when ``png`` is given (its folder is
    checked first, so an unwritable path fails before any work).
    """
    from specopt.spectral.metrics import model_aggregates, singular_values, spectrum_metrics

    if png is not None:
        check_output_path(png, flag="--out", inputs=[path])
    if match is not None:
        try:
            pattern = re.compile(match)
        except re.error as exc:
            raise CommandError(f"--match {match!r} is not a valid regular expression: {exc}") \
                from exc
    mats = collect_matrices(path)
    if match is not None:
        mats = {k: v for k, v in mats.items() if pattern.search(k)}
    if not mats:
        raise CommandError(
            f"no 2-D weights found in {str(path)!r}" + (f" matching {match!r}" if match else "")
        )
    names = list(mats)
    weights = [mats[n][0] for n in names]
    dtype = torch.float64 if float64 else torch.float32
    sigmas = singular_values(weights, dtype=dtype)  # one SVD per matrix, batched by shape
    metrics = [
        {k: float(v) for k, v in spectrum_metrics(s, shape=tuple(w.shape)).items()}
        for w, s in zip(weights, sigmas, strict=True)
    ]
    layers = [
        LayerSpectrum(n, (w.shape[0], w.shape[1]), mats[n][1], s.double().cpu(), m)
        for n, w, s, m in zip(names, weights, sigmas, metrics, strict=True)
    ]
    _print_table(path, layers)
    agg = model_aggregates(
        {k: [layer.metrics[k] for layer in layers]
         for k in ("condition_number", "gmcn", "stable_rank")}
    )
    console.print(
        "model (geometric mean over layers): "
        + ", ".join(f"{k} {fmt(v)}" for k, v in agg.items() if k != "nonfinite_matrices")
    )
    broken = [layer.name for layer in layers if not math.isfinite(layer.metrics["sigma_max"])]
    if broken:
        console.print(
            f"[bold red]{len(broken)} layer(s) hold NaN/Inf weights[/] (left out of the means): "
            + escape(", ".join(broken))
        )
    if png is not None:
        _plot(layers, Path(png), title=Path(path).name)
        console.print(f"histogram plot: [bold]{escape(str(png))}[/]")
    return layers


def _print_table(path: str | Path, layers: list[LayerSpectrum]) -> None:
    from rich.table import Table

    table = Table(title=f"spectra of {escape(str(path))}")
    cols = ("layer", "shape", "sigma_max", "sigma_min", "cond", "GMCN", "stable rank",
            "eff. rank", "rms->rms")
    width = max(len(layer.name) + (5 if layer.pc else 0) for layer in layers)
    for c in cols:
        if c == "layer":  # never truncate names: tests and users grep for them
            table.add_column(c, no_wrap=True, min_width=width)
        else:
            table.add_column(c, justify="right")
    for layer in layers:
        m = layer.metrics
        cond = fmt(m["condition_number"])
        if math.isfinite(m["condition_number"]) and m["condition_number"] > 1e3:
            cond = f"[bold red]{cond}[/]"
        table.add_row(
            layer.name + (" [cyan](PC)[/]" if layer.pc else ""),
            "x".join(map(str, layer.shape)),
            fmt(m["sigma_max"]), fmt(m["sigma_min"]), cond, fmt(m["gmcn"]),
            fmt(m["stable_rank"]), fmt(m["effective_rank"]), fmt(m.get("rms_to_rms", math.nan)),
        )
    console.print(table)


def _plot(layers: list[LayerSpectrum], out: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_h, ax_c) = plt.subplots(
        1, 2, figsize=(14, max(4.0, 0.22 * len(layers) + 1.5)), constrained_layout=True
    )
    bins = np.linspace(-4, 0, 41)  # log10(sigma / sigma_max): four decades
    for pc, color, label in ((False, "tab:blue", "plain weights"),
                             (True, "tab:orange", "PC effective weights")):
        group = [layer for layer in layers if layer.pc == pc]
        for i, layer in enumerate(group):
            s = layer.sigma.numpy()
            s = s[np.isfinite(s)]
            if not s.size or s[0] <= 0:
                continue
            rel = np.log10(np.clip(s / s[0], 1e-4, 1.0))
            ax_h.hist(rel, bins=bins, histtype="step", color=color, alpha=0.6,
                      label=label if i == 0 else None)
    ax_h.set(title=f"{title}: singular values, one line per layer",
             xlabel="log10(sigma / sigma_max)", ylabel="count")
    if ax_h.get_legend_handles_labels()[0]:  # no lines when every spectrum is zero/NaN
        ax_h.legend(fontsize=8)
    conds = [layer.metrics["condition_number"] for layer in layers]
    finite = [c if math.isfinite(c) else np.nan for c in conds]
    y = np.arange(len(layers))
    ax_c.barh(y, finite, color=["tab:orange" if layer.pc else "tab:blue" for layer in layers])
    ax_c.set_yticks(y, [layer.name for layer in layers], fontsize=7)
    ax_c.invert_yaxis()
    if any(np.isfinite(finite)) and np.nanmin(finite) > 0:
        ax_c.set_xscale("log")
    ax_c.set(title="condition number (orange: PC effective weight)", xlabel="sigma_max / sigma_min")
    try:
        write_output(out, lambda f: fig.savefig(f, format="png", dpi=100), flag="--out")
    finally:
        plt.close(fig)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="per-layer spectra of a checkpoint, state_dict or safetensors file",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("checkpoint", help="specopt checkpoint, torch state_dict or .safetensors")
    p.add_argument("--match", default=None, metavar="REGEX", help="only layers matching REGEX")
    p.add_argument("--out", default=None,
                   help="histogram PNG path (default: <checkpoint stem>_spectra.png)")
    p.add_argument("--float64", action="store_true",
                   help="exact SVD in float64 (slower; for condition numbers past ~1e6)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if is_distributed_checkpoint(args.checkpoint):  # a --ddp/--fsdp run's step_<n>/ folder
        ckpt = Path(args.checkpoint)
        out = args.out or str(ckpt.with_name(ckpt.name + "_spectra.png"))
    else:
        ckpt = check_input_file(args.checkpoint, what="weight file")  # before deriving --out
        out = args.out or str(ckpt.with_name(ckpt.stem + "_spectra.png"))
    inspect_file(args.checkpoint, match=args.match, png=out, float64=args.float64)
    return 0
