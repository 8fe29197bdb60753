"""Train the byte-level GPT with Hugging Face Accelerate and vDNN activation offload.

    python recipes/accelerate_train.py                           # policy "all", 50 steps, CPU or one GPU
    accelerate launch recipes/accelerate_train.py --policy conv  # the same under Accelerate's launcher
    python recipes/accelerate_train.py --policy none --steps 20  # hooks only: their overhead
    python recipes/accelerate_train.py --policy auto --memory-budget 8GiB   # planned to fit 8 GiB
    python recipes/accelerate_train.py --layer-streaming --policy none   # L2L: blocks stream from host memory
    python recipes/accelerate_train.py --plain                   # Accelerate alone, for comparison

The loop is Accelerate's own; the one changed line is ``lightning_vdnn.accelerate.prepare``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

import lightning_vdnn.accelerate
from lightning_vdnn.examples.data import TextDataModule
from lightning_vdnn.examples.models import GPT, GPTConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="all", help="all, conv, none or auto (default: all)")
    p.add_argument("--model", default="gpt_tiny", help=f"one of {GPTConfig.names()}")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="stdlib source bytes to train on")
    p.add_argument("--min-offload-bytes", type=int, default=2**20)
    p.add_argument("--memory-budget", default=None, help="with --policy auto: '8GiB', '60%%' or bytes")
    p.add_argument("--layer-streaming", action="store_true", help="L2L: block weights and state in host memory")
    p.add_argument("--plain", action="store_true", help="no offload: plain accelerator.prepare")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    accelerator = Accelerator()
    set_seed(0)
    data = TextDataModule(seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=args.max_bytes)
    data.setup("fit")
    model = GPT(GPTConfig.from_name(args.model, block_size=args.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    if args.plain:
        model, optimizer, loader = accelerator.prepare(model, optimizer, data.train_dataloader())
    else:
        model, optimizer, loader = lightning_vdnn.accelerate.prepare(
            accelerator, model, optimizer, data.train_dataloader(),
            policy=args.policy, min_offload_bytes=args.min_offload_bytes, memory_budget=args.memory_budget,
            layer_streaming=args.layer_streaming,
        )

    step = 0
    while step < args.steps:
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0 or step == args.steps:
                accelerator.print(f"step {step:4d}  loss {loss.item():.4f}")
            if step == args.steps:
                break

    if not args.plain:
        accelerator.print(lightning_vdnn.accelerate.memory_report(model))


if __name__ == "__main__":
    main()
