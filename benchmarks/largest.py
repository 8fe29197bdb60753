"""The largest GPT this host holds, trained with L2L at its least device memory: 5 steps, a falling loss.

    python benchmarks/largest.py --out bench_out/largest                       # GPU: fill the host's RAM
    python benchmarks/largest.py --out bench_out/largest --params 10e9 --host-state bf16
    python benchmarks/largest.py --tiny --out /tmp/largest                     # CPU, seconds

The model is ``gpt_1b``'s family at ``--width`` (default 4096, 32 heads), with as many blocks as the host memory
available takes (``--host-fraction`` of it, less a reserve) at the host bytes per block parameter of the host
state (fp32 weights, gradients and Adam moments: 16 B; ``--host-state bf16``, where the strategy offers
``host_state_dtype``: 12 B), or as many as ``--params`` asks for. ``GPT`` builds its blocks one after another in
host memory (never on the device); ``strategy="l2l"`` then moves each into its pinned host buffer. Training runs
the lean settings: block inputs to the host (``activation_offload="all"``), every block recomputed
(``saved_blocks=0``), the embeddings' and head's optimizer on the host (``offload_optimizer=True``), the loss in
``--loss-chunks`` pieces. It repeats one batch, so the loss must fall; the script exits 1 if it does not.

Prints and writes (``--out/largest.json``) the parameter count, host RSS (now and peak), the device's peak
allocation and tokens/s over the steps after the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``lightning_vdnn`` of this checkout importable
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

#: Host bytes per block parameter: fp32 weights + fp32 gradients + Adam's two moments in the host state's dtype.
HOST_BYTES = {"fp32": 4 + 4 + 8, "bf16": 4 + 4 + 4}
#: Host memory left to the process itself (CUDA context, libraries, pinned staging, activation pool).
RESERVE = 6 * 2**30
GiB = 2**30


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (largest.json)")
    p.add_argument("--tiny", action="store_true", help="gpt_tiny's shape on the CPU, 64 MiB of host state")
    p.add_argument("--params", type=float, default=None, help="parameter target (e.g. 10e9); default: fill the host")
    p.add_argument("--host-state", choices=list(HOST_BYTES), default="fp32",
                   help="dtype of the host Adam moments (bf16 needs the strategy's host_state_dtype)")
    p.add_argument("--host-fraction", type=float, default=0.85, help="share of available host memory to fill")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--loss-chunks", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    if args.tiny:
        args.width, args.heads, args.batch, args.seq = 128, 4, 2, 64
    return args


def gpt_config(args: argparse.Namespace, n_layer: int):
    from lightning_vdnn.examples.models import GPTConfig

    if args.tiny:
        return GPTConfig.from_name("gpt_tiny", n_layer=n_layer, n_embd=args.width, n_head=args.heads)
    return GPTConfig.from_name("gpt_1b", n_layer=n_layer, n_embd=args.width, n_head=args.heads,
                               block_size=max(1024, args.seq))


def block_params(config) -> tuple[int, int]:
    """(parameters of one block, parameters outside the blocks), counted on the meta device: nothing allocated."""
    from lightning_vdnn.examples.models import GPT

    with torch.device("meta"):
        one = GPT(dataclasses.replace(config, n_layer=1))
    block = sum(p.numel() for p in one.blocks[0].parameters())
    return block, sum(p.numel() for p in one.parameters()) - block


def choose_layers(args: argparse.Namespace) -> tuple[int, int, int]:
    """(blocks, parameters of the model, host bytes it needs) for ``--params``, else for the host memory available."""
    from lightning_vdnn.streaming.host_memory import available_host_bytes

    block, outside = block_params(gpt_config(args, 1))
    per_block = HOST_BYTES[args.host_state] * block
    outside_bytes = 16 * outside  # fp32 master weights and Adam moments on the host (offload_optimizer)
    available, source = available_host_bytes()
    usable = 64 * 2**20 if args.tiny else int(available * args.host_fraction) - RESERVE
    fits = (usable - outside_bytes) // per_block
    n = fits if args.params is None else math.ceil((args.params - outside) / block)
    if n < 1 or n > fits:
        raise SystemExit(f"largest: {max(n, 1)} blocks of {block / 1e6:.1f}M parameters need "
                         f"{(max(n, 1) * per_block + outside_bytes) / GiB:.1f} GiB of host memory at "
                         f"{HOST_BYTES[args.host_state]} B per parameter ({args.host_state} host state), but "
                         f"{source} has {available / GiB:.1f} GiB available ({usable / GiB:.1f} GiB usable). "
                         "Lower --params or --width, use --host-state bf16, or run on a host with more RAM.")
    return n, n * block + outside, n * per_block + outside_bytes


def strategy_kwargs(args: argparse.Namespace) -> dict:
    from lightning_vdnn import VDNNConfig

    kwargs = dict(layer_streaming=True, activation_offload="all", saved_blocks=0, offload_optimizer=True)
    if args.host_state != "fp32":
        if "host_state_dtype" not in {f.name for f in dataclasses.fields(VDNNConfig)}:
            raise SystemExit(f"largest: --host-state {args.host_state} needs VDNNConfig.host_state_dtype, which this "
                             "checkout does not have; use --host-state fp32.")
        kwargs["host_state_dtype"] = args.host_state
    return kwargs


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from lightning_vdnn import VDNNStrategy
    from lightning_vdnn.examples.tasks import LanguageModel

    cuda = torch.cuda.is_available() and not args.tiny
    n_layer, params, need = choose_layers(args)
    print(f"largest: {n_layer} blocks, {params / 1e6:,.1f}M parameters, {need / GiB:.1f} GiB of host state", flush=True)
    torch.manual_seed(0)
    task = LanguageModel(gpt_config(args, n_layer), lr=args.lr, warmup_steps=1, max_steps=args.steps,
                         loss_chunks=args.loss_chunks)  # built on the CPU, block by block
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(task.config.vocab_size, (args.batch, args.seq + 1), generator=g)
    batch = (tokens[:, :-1], tokens[:, 1:])  # the same batch every step: the loss must fall
    clock = Clock(cuda)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps,
                        precision="bf16-mixed" if cuda else "32-true", strategy=VDNNStrategy(**strategy_kwargs(args)),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock])
    trainer.fit(task, torch.utils.data.DataLoader([batch] * args.steps, batch_size=None))
    timed = clock.times[1:] or clock.times
    row = {"blocks": n_layer, "params": params, "width": args.width, "host_state": args.host_state,
           "host_state_bytes": need, "losses": clock.losses,
           "tokens_per_s": args.batch * args.seq * len(timed) / sum(timed),
           "step_s": sorted(timed)[len(timed) // 2],
           "host_rss_bytes": psutil.Process().memory_info().rss,
           "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "device_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "largest.json").write_text(json.dumps(row, indent=1))
    peak = "n/a (CPU)" if row["device_peak_bytes"] is None else f"{row['device_peak_bytes'] / GiB:.2f} GiB"
    print(f"| {params / 1e6:,.1f}M | {n_layer} x {args.width} | {args.host_state} | "
          f"{row['host_rss_bytes'] / GiB:.1f} GiB (peak {row['host_peak_rss_bytes'] / GiB:.1f}) | {peak} | "
          f"{row['tokens_per_s']:,.0f} tokens/s | losses {', '.join(f'{x:.3f}' for x in clock.losses)} |")
    if not clock.losses or clock.losses[-1] >= clock.losses[0]:
        print(f"largest: the loss did not fall over {args.steps} steps: {clock.losses}", file=sys.stderr)
        return 1
    return 0


class Clock(L.Callback):
    """Per training batch: wall time (the device synchronized) and the loss."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *_) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, *_) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))


if __name__ == "__main__":
    sys.exit(main())
