"""What the offloader's saved-tensor hooks cost the host, per step and per saved tensor.

    python benchmarks/hook_cost.py                      # 24 narrow GPT blocks on the CPU (the host's time only)
    python benchmarks/hook_cost.py --layers 24 --width 64 --steps 30

A plan's kept and offloaded layers save every tensor through ``ActivationOffloader``'s pack hook, and backward
reads each through its unpack hook: Python on the thread that also launches the GPU's kernels. Where that thread
falls behind the GPU, the GPU idles (run 19's profile of ``gpt_1b`` at 75%, ``benchmarks/README.md``). This times
one training step of a GPT made narrow enough that its kernels cost little, on the CPU, four ways: plain; under
identity hooks (what any Python ``saved_tensors_hooks`` costs); under identity hooks wrapped as ours are
(``torch.compiler.disable``); under the offloader with every tensor kept (``policy="none"``, the path of a plan's
kept layers). The differences, divided by the tensors saved per step, are the host cost per saved tensor of each
layer of that machinery. Best of ``--repeat`` interleaved rounds of ``--steps`` steps each.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.offload.offloader import ActivationOffloader

WAYS = ("plain", "identity hooks", "identity hooks, compiler-disabled", "offloader, every tensor kept")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="GPT blocks (default 24, as gpt_1b)")
    parser.add_argument("--width", type=int, default=64, help="n_embd (default 64: the kernels cost little)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: less noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt_tiny", n_layer=args.layers, n_embd=args.width, n_head=4))
    tokens = torch.randint(0, model.config.vocab_size, (2, 32))
    offloader = ActivationOffloader(torch.device("cpu"), policy="none", min_offload_bytes=0)
    offloader.attach(model, model.blocks)
    saved = count_saved(model, tokens)
    steps = {way: _step(way, model, tokens, offloader) for way in WAYS}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeat):  # the ways interleaved, so that drift (other load, clocks) falls on each alike
        for way, step in steps.items():
            times[way].append(_timed(step, args.steps))
    best = {way: min(t) for way, t in times.items()}
    print(f"{args.layers} blocks x {args.width} wide, {saved} tensors saved per step, "
          f"{torch.get_num_threads()} threads")
    base = best["plain"]
    for way in WAYS:
        extra = best[way] - base
        print(f"{way:36s} {best[way] * 1e3:8.2f} ms/step   +{extra * 1e3:6.2f} ms   "
              f"{extra / saved * 1e6:6.1f} us per saved tensor (pack and unpack)")


def count_saved(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        model(tokens).float().mean()
    return len(saved)


def _step(way: str, model: torch.nn.Module, tokens: torch.Tensor, offloader: ActivationOffloader):
    identity = lambda t: t  # noqa: E731
    hooks = {"identity hooks": identity, "identity hooks, compiler-disabled": torch.compiler.disable(identity)}

    def step() -> None:
        if way == "plain":
            model(tokens).float().mean().backward()
        elif way in hooks:
            with torch.autograd.graph.saved_tensors_hooks(hooks[way], hooks[way]):
                loss = model(tokens).float().mean()
            loss.backward()
        else:
            with offloader.capture():
                loss = model(tokens).float().mean()
            loss.backward()
            offloader.finish_pass()
    return step


def _timed(step, steps: int) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    main()
