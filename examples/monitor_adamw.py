"""Add spectral monitoring to an existing plain ``torch.optim.AdamW`` loop: two lines.

    python examples/monitor_adamw.py --steps 100 --log-dir runs/monitor-adamw
    tensorboard --logdir runs/monitor-adamw     # Custom Scalars tab: condition numbers

The loop below is ordinary PyTorch (any model, any optimizer); the lines marked
``# <- specopt`` are all that changes. The monitor hooks ``optimizer.step()`` (no wrapper
class), computes per-layer singular values every ``every`` steps and sigma_max by power
iteration every step, and fires alarms (condition number, sigma_max growth, loss spikes,
NaN/Inf) as warnings and TensorBoard text.
"""

import argparse

import torch

from specopt import SpectralMonitor
from specopt.models import Llama, LlamaConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-dir", default="runs/monitor-adamw")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    monitor = SpectralMonitor(model, log_dir=args.log_dir, every=10)  # <- specopt
    monitor.attach(optimizer)  # <- specopt

    text = open(torch.__file__, "rb").read() * 4  # any bytes will do for a demo
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - 65, (8,))
        window = torch.stack([data[s : s + 65] for s in starts.tolist()])
        loss = model.loss(window[:, :-1], window[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        monitor.record_loss(loss)  # optional: enables the loss-spike alarm
        optimizer.step()
        if step % 25 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    monitor.close()
    print(f"spectra logged for {len(monitor.layers)} matrices; tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
