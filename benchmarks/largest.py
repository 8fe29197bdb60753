"""The largest GPT this host holds, trained with L2L at its least device memory: 5 steps, a falling loss.

    python benchmarks/largest.py --out bench_out/largest                       # GPU: fill the host's RAM
    python benchmarks/largest.py --out bench_out/largest --params 10e9 --host-state bf16
    python benchmarks/largest.py --out bench_out/largest --lora 16             # LoRA: bf16 weights, frozen
    python benchmarks/largest.py --tiny --out /tmp/largest [--host-state bf16] # CPU, seconds

The model is ``gpt_1b``'s family at ``--width`` (default 4096, 32 heads), with as many blocks as the host memory
available takes, or as many as ``--params`` asks for. The host bytes are planned item by item before anything is
built, and the plan is printed: per block parameter the fp32 weights (4 B), the gradients (fp32 4 B; bf16 2 B with
``--host-state bf16``, ``streaming/bf16_grads.py``) and Adam's moments (8 B; bf16 4 B), pinned as
``PinnedArena`` carves them (its chunks counted, not the bytes asked for); the bf16 copy of the weights the update
writes for the loads on a GPU (2 B; the native one pass, ``"auto"``'s choice there), left out when only it does not
fit (loads then copy fp32 and cast on the device); the modules outside the blocks (fp32 masters and gradients
pinned, Adam on the host: ``offload_optimizer``), the block inputs in the pinned activation pool, and the process
itself (CUDA context, libraries, Python: ``--reserve-gib``); what is left of the memory available must be at least
``--margin-gib``.
So ``--params 10e9 --host-state bf16`` needs about 10 B per parameter: 107 GiB with everything for 10.1B
parameters, on a 125 GiB host.

``GPT`` builds its blocks one after another in host memory (never on the device); ``strategy="l2l"`` then moves
each into its pinned host buffer. Training runs the lean settings: block inputs to the host
(``activation_offload="all"``), every block recomputed (``saved_blocks=0``), the embeddings' and head's optimizer
on the host (``offload_optimizer=True``), the loss in ``--loss-chunks`` pieces. It repeats one batch, so the loss
must fall; the script exits 1 if it does not.

``--lora RANK`` fine-tunes instead, as LoRA users do: the model is built in bf16 and trained with
``precision="bf16-true"``, every weight frozen but ``peft``'s adapters on the blocks' linear layers. The host then
holds 2 bytes a weight (the bf16 weights themselves: no fp32 master, no gradient, no moments, no copy) beside the
adapters' small state, so the same host holds about 8 times the parameters of ``--host-state fp32``.

Prints and writes (``--out/largest.json``) the plan, the parameter count, the seconds building the model took,
host RSS (now and peak), the device's peak allocation and tokens/s over the steps after the first, as soon as the
last step ends (so a teardown that fails leaves them); then the teardown's seconds and the host RSS after it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``lightning_vdnn`` of this checkout importable
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

#: Host bytes per block parameter of each part of the host state: (weights, gradients, Adam's two moments).
HOST_BYTES = {"fp32": (4, 4, 8), "bf16": (4, 2, 4)}
GiB = 2**30


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (largest.json)")
    p.add_argument("--tiny", action="store_true", help="gpt_tiny's shape on the CPU, 64 MiB of host state")
    p.add_argument("--params", type=float, default=None, help="parameter target (e.g. 10e9); default: fill the host")
    p.add_argument("--host-state", choices=list(HOST_BYTES), default="fp32",
                   help="host state: fp32 (exact), or bf16 Adam moments and bf16 gradients (host_state_dtype='bf16')")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="LoRA fine-tuning: the model in bf16 (precision bf16-true), its weights frozen, peft adapters "
                        "of this rank on every block's linear layers trained (0: off, full training)")
    p.add_argument("--reserve-gib", type=float, default=6.0,
                   help="host memory of the process itself: CUDA context, libraries, Python")
    p.add_argument("--margin-gib", type=float, default=6.0, help="host memory the plan must leave free")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--loss-chunks", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    if args.lora < 0 or (args.lora and args.host_state != "fp32"):
        p.error(f"--lora {args.lora} --host-state {args.host_state}: give a rank of 1 or more, with the default "
                "host state (in bf16-true the host keeps the frozen bf16 weights, and the adapters' optimizer its "
                "own state)")
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


@dataclasses.dataclass
class Plan:
    """The model and its host bytes, item by item (``items``, in bytes), against the memory ``available``."""

    blocks: int
    params: int
    copies: bool  # whether the host keeps the bf16 copy of the weights the loads read
    items: dict
    available: int
    source: str
    lora: bool = False  # the weights themselves bf16 (--lora: bf16-true)

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def __str__(self) -> str:
        unit, size = ("GiB", GiB) if self.available >= GiB else ("MiB", 2**20)  # --tiny's would all read 0.0 GiB
        parts = ", ".join(f"{k} {v / size:.1f}" for k, v in self.items.items())
        return (f"largest: plan {self.blocks} blocks, {self.params / 1e6:,.1f}M parameters; host {unit}: {parts}; "
                f"total {self.total / size:.1f} of {self.available / size:.1f} available ({self.source}), "
                f"{(self.available - self.total) / size:.1f} left; "
                + ("bf16 weights, loaded as they are" if self.lora else "bf16 weight copies "
                   + ("kept" if self.copies else "none (loads cast the fp32 weights on the device)")))


def lora_params(config, rank: int) -> int:
    """Parameters of the LoRA adapters of one block: ``rank * (in + out)`` for each of its linear layers."""
    from lightning_vdnn.examples.models import GPT

    with torch.device("meta"):
        one = GPT(dataclasses.replace(config, n_layer=1))
    return sum(rank * (m.in_features + m.out_features) for m in one.blocks[0].modules()
               if isinstance(m, torch.nn.Linear))


def plan_lora(args: argparse.Namespace, n_layer: int, available: int, source: str) -> Plan:
    """``--lora``: per block parameter 2 bytes of bf16 weights (pinned), nothing else; the adapters' weights,
    gradients (bf16, packed: no frozen weight has one) and AdamW state; the modules outside the blocks frozen on the
    device; the block inputs in bf16."""
    from lightning_vdnn.streaming.host_state import PinnedArena

    cuda = not args.tiny
    block, outside = block_params(gpt_config(args, 1))
    adapters = lora_params(gpt_config(args, 1), args.lora)
    asked = [n for _ in range(n_layer) for n in (2 * (block + adapters), 2 * adapters)] + [2 * adapters] * 2
    pow2 = (lambda n: 1 << max(n - 1, 0).bit_length()) if cuda else (lambda n: n)  # torch's pinned allocator
    items = {"weights+grads (pinned)": PinnedArena.footprint(asked, total=sum(asked)) if cuda else sum(asked),
             "moments": 4 * adapters * n_layer,
             "block inputs (pinned)": n_layer * pow2(2 * args.batch * args.seq * args.width),
             "process": int(args.reserve_gib * GiB) if cuda else 0}
    return Plan(n_layer, n_layer * (block + adapters) + outside, False, items, available, source, lora=True)


def plan_host(args: argparse.Namespace, n_layer: int, copies: bool, available: int, source: str) -> Plan:
    """What ``n_layer`` blocks take in host memory (see the module docstring), pinned the way the streamer pins."""
    from lightning_vdnn.streaming.host_state import PinnedArena

    if args.lora:
        return plan_lora(args, n_layer, available, source)
    cuda = not args.tiny
    block, outside = block_params(gpt_config(args, 1))
    weights, grads, moments = HOST_BYTES[args.host_state]
    asked = [n for _ in range(n_layer) for n in (weights * block, grads * block)] + [grads * block] * 2
    pinned = PinnedArena.footprint(asked, total=sum(asked)) if cuda else sum(asked)
    items = {"weights+grads (pinned)": pinned, "moments": moments * block * n_layer}
    if copies:
        items["bf16 copies (pinned)"] = PinnedArena.footprint([2 * block] * n_layer, total=2 * block * n_layer)
    pow2 = (lambda n: 1 << max(n - 1, 0).bit_length()) if cuda else (lambda n: n)  # torch's pinned allocator
    items["outside blocks"] = sum(2 * pow2(4 * n) + 8 * n for n in outside_sizes(gpt_config(args, 1)))
    items["block inputs (pinned)"] = n_layer * pow2(4 * args.batch * args.seq * args.width)
    items["process"] = int(args.reserve_gib * GiB) if cuda else 0
    return Plan(n_layer, n_layer * block + outside, copies, items, available, source)


def choose_layers(args: argparse.Namespace) -> Plan:
    """The plan for ``--params`` (with the bf16 copies where they fit too), else the most blocks that fit."""
    from lightning_vdnn.streaming.host_memory import available_host_bytes

    block, outside = block_params(gpt_config(args, 1))
    available, source = available_host_bytes()
    if args.tiny:
        available, source = 64 * 2**20 + 16 * outside, "--tiny's 64 MiB of block state"
    margin = 0 if args.tiny else int(args.margin_gib * GiB)
    # only the one-pass update writes copies, on a GPU ("auto" takes it for fp32 moments too); bf16-true has none
    one_pass = not args.tiny and not args.lora
    fits = lambda plan: plan.total + margin <= available  # noqa: E731
    if args.params is not None:
        n = max(math.ceil((args.params - outside) / block), 1)
        plans = [plan_host(args, n, c, available, source) for c in ([True, False] if one_pass else [False])]
    else:
        plans = []
        for copies in ([True, False] if one_pass else [False]):
            n = 1
            while fits(plan_host(args, n * 2, copies, available, source)):
                n *= 2
            hi = n * 2
            while hi - n > 1:  # the most blocks that fit, by bisection
                mid = (n + hi) // 2
                n, hi = (mid, hi) if fits(plan_host(args, mid, copies, available, source)) else (n, mid)
            plans.append(plan_host(args, n, copies, available, source))
        plans.sort(key=lambda plan: -plan.blocks)  # the most blocks; with copies on a tie (listed first)
    for plan in plans:
        if fits(plan):
            return plan
    plan = plans[-1]
    raise SystemExit(f"{plan}\nlargest: that leaves less than the {margin / GiB:.1f} GiB margin. Lower --params or "
                     "--width, use --host-state bf16, or run on a host with more RAM.")


def outside_sizes(config) -> list[int]:
    """Element counts of the parameters outside the blocks, on the meta device."""
    from lightning_vdnn.examples.models import GPT

    with torch.device("meta"):
        one = GPT(dataclasses.replace(config, n_layer=1))
    inside = {id(p) for p in one.blocks.parameters()}
    return [p.numel() for p in one.parameters() if id(p) not in inside]


@contextlib.contextmanager
def parallel_init() -> Iterator[None]:
    """``GPT``'s init with every N(0, std) fill spread over the cores, and no Kaiming init of ``nn.Linear`` first.

    torch fills a tensor from one generator on one core (about 50M values a second): a 10B model's two passes
    (``nn.Linear``'s own init, then ``GPT.reset_parameters``, which re-initialises every ``Linear``) would take
    minutes of the run. Here each fill is cut into pieces, each from its own generator seeded from torch's.
    """
    normal, linear_init = torch.nn.init.normal_, torch.nn.Linear.reset_parameters
    pool = ThreadPoolExecutor(torch.get_num_threads())

    @torch.no_grad()
    def fill(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, generator=None) -> torch.Tensor:
        pieces = tensor.detach().view(-1).split(1 << 22)
        seeds = torch.randint(2**62, (len(pieces),), generator=generator).tolist()
        list(pool.map(lambda p, s: p.normal_(mean, std, generator=torch.Generator().manual_seed(s)), pieces, seeds))
        return tensor

    torch.nn.init.normal_, torch.nn.Linear.reset_parameters = fill, lambda self: None  # GPT's init sets them all
    try:
        yield
    finally:
        torch.nn.init.normal_, torch.nn.Linear.reset_parameters = normal, linear_init
        pool.shutdown()


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

    from lightning_vdnn.streaming.streamer import LayerStreamer

    cuda = torch.cuda.is_available() and not args.tiny
    plan = choose_layers(args)
    n_layer, params = plan.blocks, plan.params
    print(plan, flush=True)
    LayerStreamer.host_copies = plan.copies  # the plan's choice, not the streamer's own estimate (no margin there)
    torch.manual_seed(0)
    start = time.perf_counter()
    found = torch.get_default_dtype()
    if args.lora:
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: never an fp32 copy of the model on the host
    try:
        with parallel_init():  # built on the CPU, block by block
            task = LanguageModel(gpt_config(args, n_layer), lr=args.lr, warmup_steps=1, max_steps=args.steps,
                                 loss_chunks=args.loss_chunks)
            if args.lora:
                add_lora(task.model, args.lora)
    finally:
        torch.set_default_dtype(found)
    build_s = time.perf_counter() - start
    print(f"largest: model built on the host in {build_s:.1f} s ({build_s / params * 1e9:.2f} s per 1e9 "
          "parameters)", flush=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(task.config.vocab_size, (args.batch, args.seq + 1), generator=g)
    batch = (tokens[:, :-1], tokens[:, 1:])  # the same batch every step: the loss must fall
    row: dict = {}

    def report() -> None:  # after the last step, before teardown: the numbers survive a teardown that fails
        row.update(result_row(args, plan, clock, build_s, cuda))
        write_row(args.out, row)
        print(summary(row, clock.losses), flush=True)

    clock = Clock(cuda, on_end=report)
    precision = "bf16-true" if args.lora else "bf16-mixed" if cuda else "32-true"
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps,
                        precision=precision, strategy=VDNNStrategy(**strategy_kwargs(args)),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock])
    trainer.fit(task, torch.utils.data.DataLoader([batch] * args.steps, batch_size=None))
    row["teardown_s"] = time.perf_counter() - clock.ended
    row["host_rss_after_teardown_bytes"] = psutil.Process().memory_info().rss
    row["host_peak_rss_with_teardown_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_row(args.out, row)
    print(f"largest: teardown {row['teardown_s']:.1f} s, host RSS after it "
          f"{row['host_rss_after_teardown_bytes'] / GiB:.1f} GiB, peak over the run "
          f"{row['host_peak_rss_with_teardown_bytes'] / GiB:.1f} GiB", flush=True)
    if not clock.losses or clock.losses[-1] >= clock.losses[0]:
        print(f"largest: the loss did not fall over {args.steps} steps: {clock.losses}", file=sys.stderr)
        return 1
    return 0


def add_lora(model: torch.nn.Module, rank: int) -> None:
    """``peft``'s LoRA adapters of ``rank`` on every linear layer of the blocks; every other weight frozen."""
    import peft

    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.blocks.named_modules()
                      if isinstance(m, torch.nn.Linear)})
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                 lora_dropout=0.0), model.blocks)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def result_row(args: argparse.Namespace, plan: Plan, clock: "Clock", build_s: float, cuda: bool) -> dict:
    """What ``largest.json`` records of the run, read at the end of the last step."""
    timed = clock.times[1:] or clock.times
    return {"blocks": plan.blocks, "params": plan.params, "outside_params": sum(outside_sizes(gpt_config(args, 1))),
            "width": args.width, "host_state": f"bf16-true, LoRA rank {args.lora}" if args.lora else args.host_state,
            "lora_rank": args.lora,
            "plan_bytes": plan.items, "plan_total_bytes": plan.total, "available_bytes": plan.available,
            "weight_copies": plan.copies, "build_s": build_s, "host_state_bytes": clock.host_state_bytes,
            "losses": clock.losses,
            "tokens_per_s": args.batch * args.seq * len(timed) / sum(timed),
            "step_s": sorted(timed)[len(timed) // 2],
            "host_rss_bytes": psutil.Process().memory_info().rss,
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def write_row(out: Path, row: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "largest.json").write_text(json.dumps(row, indent=1))


def summary(row: dict, losses: list[float]) -> str:
    """The row of the benchmark notes' table."""
    peak = "n/a (CPU)" if row["device_peak_bytes"] is None else f"{row['device_peak_bytes'] / GiB:.2f} GiB"
    return (f"| {row['params'] / 1e6:,.1f}M | {row['blocks']} x {row['width']} | {row['host_state']} | "
            f"{row['host_rss_bytes'] / GiB:.1f} GiB (peak {row['host_peak_rss_bytes'] / GiB:.1f}) | {peak} | "
            f"{row['tokens_per_s']:,.0f} tokens/s | losses {', '.join(f'{x:.3f}' for x in losses)} |")


class Clock(L.Callback):
    """Per training batch: wall time (the device synchronized) and the loss."""

    def __init__(self, cuda: bool, on_end: Callable[[], None]) -> None:
        self.cuda, self.on_end = cuda, on_end
        self.ended = 0.0  # when training ended (teardown starts after it)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.host_state_bytes: Optional[int] = None
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
        self.host_state_bytes = trainer.strategy.memory_report().host_state_bytes  # while the optimizer is attached

    def on_train_end(self, trainer, module) -> None:  # before the strategy's teardown releases the host state
        self.on_end()
        self.ended = time.perf_counter()


if __name__ == "__main__":
    sys.exit(main())
