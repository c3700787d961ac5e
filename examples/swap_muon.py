"""Swap ``torch.optim.Muon`` for ``specopt.Muon``: same constructor, same meaning.

    python examples/swap_muon.py --steps 30

``specopt.Muon`` accepts torch's arguments with torch's meaning (lr, weight_decay,
momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn). Passing
``ns_coefficients`` reproduces torch's iteration exactly; leaving it out uses specopt's
faster default (4-step Polar Express schedule, Gram side for rectangular matrices,
same-shaped matrices batched). Muon is for hidden 2-D weights only: embeddings, the
output head and 1-D parameters stay with AdamW (``specopt.build_optimizer`` does this
routing for you; here it is written out by hand, as in a torch.optim.Muon script).
"""

import argparse
import time

import torch

import specopt
from specopt.models import Llama, LlamaConfig


def train(muon_cls: type, steps: int, **muon_kwargs) -> list[float]:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=2))
    hidden = [p for n, p in model.named_parameters()
              if p.ndim == 2 and "tok_embeddings" not in n and not n.startswith("output")]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    muon = muon_cls(hidden, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw",
                    **muon_kwargs)
    adamw = torch.optim.AdamW(rest, lr=0.02 * 0.2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 256, (8, 64), generator=gen)
        x[:, 1::2] = x[:, ::2]  # learnable: every odd byte repeats the previous one
        loss = model.loss(x[:, :-1], x[:, 1:])
        for opt in (muon, adamw):
            opt.zero_grad()
        loss.backward()
        muon.step()
        adamw.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch_coeffs = {"ns_coefficients": (3.4445, -4.7750, 2.0315), "ns_steps": 5}
    variants = [("specopt.Muon, torch mode", specopt.Muon, torch_coeffs),
                ("specopt.Muon, default", specopt.Muon, {})]
    if hasattr(torch.optim, "Muon"):  # PyTorch >= 2.9
        variants.insert(0, ("torch.optim.Muon", torch.optim.Muon, {}))
    for name, cls, kwargs in variants:
        t0 = time.perf_counter()
        losses = train(cls, args.steps, **kwargs)
        print(f"{name:26s} loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
              f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
