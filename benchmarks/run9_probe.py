"""Run 9's probe, kept as it ran (``python3 benchmarks/run9_probe.py`` on the GPU machine, the install line first).

Two questions from run 9 (``README.md``, *Run 9*): why the planner's profiled layer times on gpt_1b were 0.6-2 s
per block (the first step pins 340 host buffers: 16.9 s, while the GPU idles inside the layers' spans), and how
fast the host's fused AdamW over gpt_1b's 1.21B block parameters runs alone and under pinned copies both ways
(0.26 s alone, 0.56-0.58 s under copies: host memory bandwidth is what bounds L2L's step).
"""
import sys, time, threading, torch
sys.path.insert(0, ".")
import lightning_vdnn
from lightning_vdnn.offload import host_pool as poolmod
from benchmarks.workloads import build

dev = torch.device("cuda")
w = build("gpt_1b", dev)
model = w.model.to(dev)
opt = w.optimizer(model.parameters(), dev)
alloc_ms = [0.0, 0]
orig = poolmod.HostBufferPool._allocate
def timed(self, n):
    t = time.perf_counter(); out = orig(self, n); alloc_ms[0] += (time.perf_counter() - t) * 1e3; alloc_ms[1] += 1; return out
poolmod.HostBufferPool._allocate = timed
for step in range(4):
    torch.cuda.synchronize(); t0 = time.perf_counter(); alloc_ms[:] = [0.0, 0]
    with lightning_vdnn.offload_activations(model, "auto", memory_budget=27356605056) as h:
        with torch.autocast("cuda", torch.bfloat16):
            loss = w.loss(model, w.batch)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    print(f"step {step}: {time.perf_counter()-t0:.3f}s pinned allocs {alloc_ms[1]} in {alloc_ms[0]:.0f} ms", flush=True)
    wt = h.offloader._watched
    if wt is not None and wt.timeline is not None and step <= 1:
        tl = wt.timeline
        print("  raw   ", [round(x, 1) for x in tl.forward_ms()])
        print("  comp  ", [round(x, 1) for x in tl.compute_ms()])
        print("  module", [round(x, 1) for x in tl.module_ms()])
        print("  stalls", len(tl._stalls), round(sum(s.elapsed_time(e) for _, _, s, e in tl._stalls), 1), "ms")
    p = h.planner
    if p._layers:
        print("  plan", p.plan and (sorted(p.plan.kept), sorted(p.plan.recomputed), p.plan.added_ms))
        for l in p._layers[:3]: print("   ", l)
del model, opt, h; torch.cuda.empty_cache()

# host AdamW over 1.21B fp32 (24 x 50.4M), alone and under pinned DMA both ways
torch.set_num_threads(16)
n = 50_380_800
ps = [torch.zeros(n) for _ in range(24)]
for p in ps: p.grad = torch.zeros(n)
ad = torch.optim.AdamW(ps, lr=1e-4, fused=True)
def adam():
    t = time.perf_counter(); ad.step(); return time.perf_counter() - t
adam()
print("fused AdamW alone: %.3f %.3f s" % (adam(), adam()), flush=True)
hb = torch.empty(2 << 30, dtype=torch.uint8, pin_memory=True); hb2 = torch.empty(2 << 30, dtype=torch.uint8, pin_memory=True)
db = torch.empty(2 << 30, dtype=torch.uint8, device=dev); db2 = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
stop = False
def dma():
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream(); k = 0
    while not stop:
        with torch.cuda.stream(s1): db.copy_(hb, non_blocking=True)
        with torch.cuda.stream(s2): hb2.copy_(db2, non_blocking=True)
        torch.cuda.synchronize(); k += 1
    print("  dma GB moved", k * 4.29, flush=True)
th = threading.Thread(target=dma); th.start(); time.sleep(0.2)
t = time.perf_counter(); a = [adam() for _ in range(3)]; el = time.perf_counter() - t
stop = True; th.join()
print("fused AdamW under DMA both ways:", [round(x, 3) for x in a], flush=True)
for threads in (8, 12):
    torch.set_num_threads(threads); print(f"fused AdamW alone {threads} threads: %.3f" % adam(), flush=True)
