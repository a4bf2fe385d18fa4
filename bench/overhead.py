"""varprobe's probe against a bare forward + backward on the same model and input.

Both sides run the same forward, the same cotangent and the same ``torch.autograd.grad``
call (w.r.t. every parameter and the float input), so the ratio is what the hooks, the
on-device statistics and the report cost on top of the pass itself.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import varprobe
from bench import models
from varprobe import recorder


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    describe: str


def cases(device: torch.device) -> list[Case]:
    torch.manual_seed(0)
    gpt = models.GPT()
    return [
        Case("MLP", models.mlp(), torch.randn(256, 1024),
             "30 x (Linear 1024->1024, ReLU), batch 256"),
        Case("ResNet", models.ResNet(), torch.randn(64, 3, 32, 32),
             "ResNet-18-style, 3 stages x 2 basic blocks (32/64/128 ch), BN, batch 64 x 3x32x32"),
        Case("GPT", gpt, torch.randint(0, 4096, (8, 256)),
             "4 pre-norm blocks, d 256, 4 heads, vocab 4096, batch 8 x 256 tokens"),
    ]


def cotangent(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        shape = model(x).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(x.device)


def bare(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Any:
    """What probe() does minus varprobe: own the float input, forward, autograd.grad."""
    wrt = [p for p in model.parameters() if p.requires_grad]
    if x.is_floating_point():
        leaf = x.detach().requires_grad_()
        wrt.append(leaf)
        x = leaf.clone()
    out = model(x)
    return torch.autograd.grad([out], wrt, [g], allow_unused=True)


def probed(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Any:
    return varprobe.probe(model, x, grad_output=g, mode=None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timings(case: Case, device: torch.device, repeats: int, warmup: int) -> dict[str, list]:
    """Seconds per call, bare and probed interleaved so that machine noise hits both.

    Wall-clock and process CPU time: on a shared machine the CPU time of a
    single-threaded run is what the work costs, the wall clock adds the neighbours.
    """
    g = cotangent(case.model, case.inputs)
    out: dict[str, list] = {"bare": [], "probe": [], "bare_cpu": [], "probe_cpu": []}
    for i in range(warmup + repeats):
        for name, fn in (("bare", bare), ("probe", probed)):
            sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            result = fn(case.model, case.inputs, g)
            sync(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            del result
            if i >= warmup:
                out[name].append(elapsed)
                out[f"{name}_cpu"].append(cpu)
    return out


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn`` above what was live before it.

    CUDA: the caching allocator's counters. CPU: the profiler's allocation events replayed
    in time order (RSS sampling misses short peaks and sees malloc's caching).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def transfers(case: Case) -> int:
    """Device-to-host transfers per probe on CUDA: syncs outside collect() raise."""
    g = cotangent(case.model, case.inputs)
    original = recorder.Recorder.collect
    count = 0

    def collect(self):
        nonlocal count
        count += 1
        torch.cuda.set_sync_debug_mode(0)
        try:
            return original(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    recorder.Recorder.collect = collect
    torch.cuda.set_sync_debug_mode("error")
    try:
        probed(case.model, case.inputs, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        recorder.Recorder.collect = original
    return count


def summarize(t: dict[str, list], clock: str = "") -> dict[str, float]:
    """Medians, their ratio, and the spread of the per-pair ratios (quartiles, extremes)."""
    bare, probe = t["bare" + clock], t["probe" + clock]
    ratios = sorted(p / b for p, b in zip(probe, bare))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else ratios * 3
    return {"bare_ms": 1e3 * statistics.median(bare), "probe_ms": 1e3 * statistics.median(probe),
            "ratio": statistics.median(probe) / statistics.median(bare),
            "pair_q1": q1, "pair_q3": q3, "pair_min": ratios[0], "pair_max": ratios[-1]}


def run(device: torch.device, repeats: int, warmup: int, log=print) -> list[dict]:
    rows = []
    for case in cases(device):
        case.model.to(device)
        case.inputs = case.inputs.to(device)
        t = timings(case, device, repeats, warmup)
        g = cotangent(case.model, case.inputs)
        model, x = case.model, case.inputs
        mem_bare = peak_bytes(functools.partial(bare, model, x, g), device)
        mem_probe = peak_bytes(functools.partial(probed, model, x, g), device)
        layers = len(probed(model, x, g).layers)
        row = {"device": device.type, "model": case.name, "describe": case.describe,
               "layers": layers, "repeats": repeats, "wall": summarize(t),
               "cpu": summarize(t, "_cpu") if device.type == "cpu" else None,
               "mem_bare_mb": mem_bare / 2**20, "mem_probe_mb": mem_probe / 2**20,
               "mem_ratio": mem_probe / mem_bare,
               "transfers": transfers(case) if device.type == "cuda" else None}
        w = row["wall"]
        log(f"{device.type:4} {case.name:7} bare {w['bare_ms']:8.1f} ms  probe "
            f"{w['probe_ms']:8.1f} ms  wall ratio {w['ratio']:.3f} (pairs {w['pair_q1']:.3f}-"
            f"{w['pair_q3']:.3f})" + (f"  cpu-time ratio {row['cpu']['ratio']:.3f}"
                                      if row["cpu"] else "")
            + f"  peak {row['mem_bare_mb']:.1f} -> {row['mem_probe_mb']:.1f} MiB "
              f"({row['mem_ratio']:.3f}x)")
        rows.append(row)
        case.model.to("cpu")
    return rows
