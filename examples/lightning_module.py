"""Train specopt's small Llama with Lightning: ``build_optimizer`` in
``configure_optimizers``, the PC layer, and spectral monitoring through a callback.

    pip install 'specopt[lightning]'
    python examples/lightning_module.py --steps 200 --root-dir runs/lightning
    tensorboard --logdir runs/lightning    # train_loss and spectral/* in one event file

What specopt adds to an ordinary LightningModule:

1. ``specopt.apply_pc(self.model, level=2)`` in ``__init__`` (FFN and attention output
   matrices);
2. ``configure_optimizers`` returns ``specopt.build_optimizer(self, "muon", ...)`` (Muon
   for hidden matrices, AdamW for the rest) and an LR scheduler;
3. ``SpectralMonitorCallback(every=...)`` in ``Trainer(callbacks=...)``: writes into the
   Trainer's TensorBoardLogger and attaches the PC u/v refresh to the optimizer.
"""

import argparse
import math

import lightning as L
import torch

import specopt
from specopt.data import BatchSampler, load_corpus
from specopt.integrations.lightning import SpectralMonitorCallback
from specopt.models import Llama, LlamaConfig


class LitLlama(L.LightningModule):
    def __init__(self, dim: int, layers: int, lr: float, steps: int) -> None:
        super().__init__()
        self.model = Llama(LlamaConfig(vocab_size=256, dim=dim, n_layers=layers,
                                       n_heads=max(1, dim // 32)))
        self.pc = specopt.apply_pc(self.model, level=2)
        self.lr, self.steps = lr, steps

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = self.model.loss(*batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = specopt.build_optimizer(self, "muon", lr=self.lr, weight_decay=0.1)
        warmup = max(1, self.steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(
                math.pi * min(s, self.steps) / self.steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule,
                                                         "interval": "step"}}


class Windows(torch.utils.data.IterableDataset):
    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int) -> None:
        self.sampler = BatchSampler(data, batch_size=batch_size, seq_len=seq_len, seed=0)

    def __iter__(self):
        return iter(self.sampler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--every", type=int, default=25, help="snapshot cadence (steps)")
    parser.add_argument("--root-dir", default="runs/lightning")
    args = parser.parse_args()

    torch.manual_seed(0)
    module = LitLlama(args.dim, args.layers, args.lr, args.steps)
    corpus = load_corpus(max_bytes=400_000)
    data = torch.utils.data.DataLoader(Windows(corpus.train, args.batch_size, args.seq_len),
                                       batch_size=None)
    callback = SpectralMonitorCallback(every=args.every)
    trainer = L.Trainer(max_steps=args.steps, callbacks=[callback], accelerator="cpu",
                        default_root_dir=args.root_dir, log_every_n_steps=max(1, args.every),
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, data)
    print(f"PC layers: {len(module.pc)}; last train loss "
          f"{float(trainer.callback_metrics['train_loss']):.3f} nats/byte")
    print(f"spectral tags in {callback.log_dir}")
    print(f"tensorboard --logdir {args.root_dir}")


if __name__ == "__main__":
    main()
