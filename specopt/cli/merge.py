"""``specopt merge CHECKPOINT OUT``: fold PC layers into plain weights for deployment.

Rebuilds the checkpoint's model, calls :func:`specopt.pc.merge_pc` (each PC layer's
``W_eff = gamma * s * f(W / s)`` is written into a plain ``nn.Linear.weight``), checks
that a fresh plain ``Llama`` loaded from the result gives the same logits as the PC model,
and writes OUT atomically: a ``.safetensors`` file when OUT ends so (config in its
metadata), else a plain ``torch.save`` state_dict. The model config goes next to it as
``OUT.json``. Load it with::

    cfg = LlamaConfig(**json.load(open("OUT.json")))
    model = Llama(cfg); model.load_state_dict(torch.load("OUT"))
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from specopt.cli._console import CommandError, console
from specopt.cli._files import (
    check_output_path,
    checkpoint_model,
    load_specopt_checkpoint,
    refuse_nonfinite,
    require_safetensors,
    write_output,
)

__all__ = ["add_parser", "merge_checkpoint", "run"]

#: Max |logit difference| accepted between the PC model and the merged plain model (fp32).
MERGE_ATOL = 1e-4


def merge_checkpoint(path: str | Path, out: str | Path) -> tuple[Path, float]:
    """Merge the PC layers of a specopt checkpoint; returns (OUT, max |logit diff|).

    Refused with a one-line :class:`CommandError` (before writing anything): OUT (or its
    ``.json`` sidecar) not writable or the checkpoint itself, ``.safetensors`` OUT
    without the package, a file that is not a specopt checkpoint, a missing model config,
    tensors that do not match it, or NaN/Inf weights (named).
    """
    from specopt.models.llama import Llama, LlamaConfig

    out_path = check_output_path(out, flag="OUT", inputs=[path])
    sidecar = out_path.with_name(out_path.name + ".json")
    check_output_path(sidecar, flag="OUT.json", inputs=[path])
    if out_path.suffix == ".safetensors":
        require_safetensors(f"writing {str(out_path)!r}")
    ckpt = load_specopt_checkpoint(path)
    refuse_nonfinite(ckpt["model"], path, action="merge it")
    model = checkpoint_model(ckpt, path)
    cfg = ckpt["config"]
    model_cfg = LlamaConfig(**cfg["model"])
    probe = torch.randint(0, model_cfg.vocab_size, (2, min(64, model_cfg.max_seq_len)),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(probe)
    if cfg.get("pc"):
        from specopt.pc import merge_pc

        merge_pc(model)
    else:
        console.print("checkpoint has no PC layers: writing its weights unchanged")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    plain = Llama(model_cfg)
    try:
        plain.load_state_dict(state)  # strict: the merged keys must be exactly a plain model's
    except RuntimeError as exc:
        raise CommandError(f"merged weights do not load into a plain Llama: {exc}") from exc
    plain.eval()
    with torch.no_grad():
        diff = float((plain(probe) - reference).abs().max())
    if not diff <= MERGE_ATOL:
        raise CommandError(f"merged model differs from the PC model: max |logit diff| {diff:.3g}")

    config_json = json.dumps(model_cfg.to_dict())
    if out_path.suffix == ".safetensors":
        from safetensors.torch import save

        # Tied embeddings share storage; safetensors refuses shared tensors, so copy.
        blob = save({k: v.clone() for k, v in state.items()}, metadata={"config": config_json})
        write_output(out_path, lambda f: f.write(blob), flag="OUT")
    else:
        write_output(out_path, lambda f: torch.save(state, f), flag="OUT")
    write_output(sidecar, lambda f: f.write(config_json.encode()), flag="OUT.json")
    return out_path, diff


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="merge PC layers into plain weights (loads into a plain model)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("checkpoint", help="specopt checkpoint (from `specopt train`)")
    p.add_argument("out", help="output file: .pt state_dict or .safetensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out, diff = merge_checkpoint(args.checkpoint, args.out)
    console.print(
        f"merged weights: [bold]{out}[/] (config {out.name}.json); "
        f"max |logit diff| vs PC model {diff:.2e}"
    )
    return 0
