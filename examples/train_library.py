"""Train a small Llama with Muon + the PC layer + the spectral monitor, using the library
directly (no CLI). About 1-2 minutes on a laptop CPU with the defaults.

    python examples/train_library.py --steps 200 --log-dir runs/example
    tensorboard --logdir runs/example

Steps: build the model, wrap its FFN / attention-output weights with the PC layer, build
one optimizer (Muon for hidden matrices, AdamW for embeddings, head, norms and PC gains),
attach the PC u/v refresh and the monitor to it, train on the embedded stdlib corpus,
then merge the PC layers into plain weights for deployment.
"""

import argparse
import math

import torch

import specopt
from specopt.data import BatchSampler, bits_per_byte, eval_windows, load_corpus
from specopt.models import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--log-dir", default="runs/example")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = specopt.Llama(PRESETS[args.preset])
    pc = specopt.apply_pc(model, level=2)  # level 2 with Muon, 4 with AdamW (paper)
    optimizer = specopt.build_optimizer(model, "muon", lr=args.lr, weight_decay=0.1)
    pc.attach(optimizer)  # refresh the power-iteration vectors after every step
    monitor = specopt.SpectralMonitor(model, log_dir=args.log_dir, every=20)
    monitor.attach(optimizer)  # spectra, condition numbers and alarms -> TensorBoard
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine to 0.1x
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else
        0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup))),
    )

    corpus = load_corpus()
    batches = BatchSampler(corpus.train, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    val = eval_windows(corpus.val, batch_size=args.batch_size, seq_len=args.seq_len,
                       max_batches=4)
    for step in range(1, args.steps + 1):
        x, y = next(batches)
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        monitor.record_loss(loss)  # feeds the loss-spike alarm
        optimizer.step()  # hooks: PC u/v refresh, then the monitor
        schedule.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}: train loss {loss.item():.3f} nats/byte")
    monitor.close()

    model.eval()
    with torch.no_grad():
        val_loss = sum(float(model.loss(w[:, :-1], w[:, 1:])) for w in val) / len(val)
    print(f"validation: {bits_per_byte(val_loss):.3f} bits/byte")
    specopt.merge_pc(model)  # W_eff baked into plain nn.Linear weights: no PC at inference
    with torch.no_grad():
        merged = sum(float(model.loss(w[:, :-1], w[:, 1:])) for w in val) / len(val)
    print(f"after merge_pc: {bits_per_byte(merged):.3f} bits/byte (same function)")
    print(f"tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
