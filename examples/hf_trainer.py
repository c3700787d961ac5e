"""Train a Hugging Face GPT-2 with ``transformers.Trainer``, specopt's Muon + AdamW and the
PC layer, with spectral monitoring through a Trainer callback.

    pip install 'specopt[hf]'
    python examples/hf_trainer.py --steps 200 --output-dir runs/hf-gpt2
    tensorboard --logdir runs/hf-gpt2     # the Trainer's curves and spectral/* side by side

The model is built from a config (random init, nothing downloaded) and trained on the
embedded byte corpus (vocab 256). What specopt adds to an ordinary Trainer script:

1. ``specopt.apply_pc(model, level=2)``: PC on GPT-2's ``mlp.c_fc``, ``mlp.c_proj`` and
   ``attn.c_proj`` (transformers' ``Conv1D``, weights stored ``(in, out)``).
2. ``specopt.build_optimizer(model, "muon")`` passed as ``Trainer(optimizers=(opt, sched))``:
   Muon for hidden matrices, AdamW for embeddings, norms, biases and PC gains.
3. ``SpectralMonitorCallback(every=...)``: the monitor, and the PC u/v refresh attached
   to the optimizer the Trainer steps.
4. ``specopt.merge_pc(model)`` before ``save_pretrained``: the checkpoint is a plain GPT-2
   that ``from_pretrained`` loads without specopt.
"""

import argparse
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import specopt
from specopt.data import load_corpus
from specopt.integrations.huggingface import SpectralMonitorCallback


class ByteWindows(torch.utils.data.Dataset):
    """Fixed-length windows of a byte corpus as causal-LM examples."""

    def __init__(self, data: torch.Tensor, seq_len: int, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(data) - seq_len - 1, (n,), generator=gen)
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[i])
        x = self.data[s : s + self.seq_len].long()
        return {"input_ids": x, "labels": x}  # GPT2LMHeadModel shifts the labels itself


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--every", type=int, default=25, help="snapshot cadence (steps)")
    parser.add_argument("--output-dir", default="runs/hf-gpt2")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=args.dim, n_layer=args.layers,
                        n_head=max(1, args.dim // 64), n_positions=args.seq_len,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    pc = specopt.apply_pc(model, level=2)  # level 2 with Muon (paper)
    optimizer = specopt.build_optimizer(model, "muon", lr=args.lr, weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(
            math.pi * min(s, args.steps) / args.steps)))

    corpus = load_corpus(max_bytes=400_000)
    train = ByteWindows(corpus.train, args.seq_len, n=args.steps * args.batch_size)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir, max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, logging_steps=max(1, args.every),
            report_to=["tensorboard"] if _has_tensorboard() else [], save_strategy="no",
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        ),
        train_dataset=train,
        optimizers=(optimizer, schedule),
        callbacks=[SpectralMonitorCallback(every=args.every)],
    )
    result = trainer.train()
    print(f"PC layers: {len(pc)}; final train loss {result.training_loss:.3f} nats/byte")

    specopt.merge_pc(model)  # plain Conv1D weights again: a stock GPT-2 checkpoint
    model.save_pretrained(f"{args.output_dir}/merged")
    reloaded = GPT2LMHeadModel.from_pretrained(f"{args.output_dir}/merged").eval()
    x = train[0]["input_ids"][None]
    with torch.no_grad():
        diff = (model.eval()(x).logits - reloaded(x).logits).abs().max().item()
    print(f"saved {args.output_dir}/merged; reloaded without specopt, max logit diff {diff:.1e}")
    print(f"tensorboard --logdir {args.output_dir}")


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
