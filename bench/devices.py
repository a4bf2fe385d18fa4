"""``python -m bench.devices``: the same probe on the CPU and on a GPU, over the corpus.

Per network: ``varprobe.probe`` on the CPU and on ``--device`` (same seed; the inputs and
the cotangent are drawn on the CPU, so both sides see the same numbers) with TF32 off,
then on the GPU again with torch's default TF32 setting for convolutions. Compared:
every layer's recorded forward and backward variances (relative difference), the flags
(severity, code, layer) and the verdict; and whether the model came back as it was
(its parameters and buffers on the CPU, bit for bit). A network with dropout draws its
masks from each device's own generator, so its statistics differ by sampling, not by
rounding: such rows are marked.

The first GPU probe runs under ``torch.cuda.set_sync_debug_mode("warn")``: every
operation that makes the host wait for the GPU is attributed to the innermost Python
frame outside torch, varprobe's own (outside its one transfer, ``collect``) or the
model's, and listed. The mode cannot tell a copy to the GPU from one back: varprobe's
three uploads per probe (the inputs, the model's copy, the cotangent) show as waits.

Needs a GPU; the suite never runs it. Writes JSON lines to ``--output`` as it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import corpus
import varprobe
from bench import machine
from bench.survey import flags_of


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor)}


def as_found(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = snapshot(model)
    return after.keys() == before.keys() and all(
        a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
        and torch.equal(a, b) for a, b in ((after[k], before[k]) for k in before))


def variances(report: varprobe.Report) -> dict[str, float]:
    out = {}
    for layer in report.layers:
        for side in ("forward", "backward"):
            stats = getattr(layer, side)
            if stats is not None and stats.var is not None and math.isfinite(stats.var):
                out[f"{layer.label} {side}"] = stats.var
    return out


def relative(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def flag_set(report: varprobe.Report) -> list[tuple[str, str, str]]:
    return sorted((sev, f["code"], f["layer"]) for sev, fs in flags_of(report).items()
                  for f in fs)


@contextlib.contextmanager
def waits(found: dict[str, list[str]]):
    """Record where each host wait happens: found["varprobe"] and found["model"]."""
    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = traceback.extract_stack()[:-1]
        if any(f.name == "collect" and "/varprobe/" in f.filename for f in frames):
            return  # the one transfer
        # the recording's __torch_function__ runs the model's own op on its behalf
        own = [f for f in frames if "/torch/" not in f.filename and "/bench/" not in f.filename
               and "warnings" not in f.filename and f.name != "__torch_function__"]
        f = own[-1] if own else frames[-1]
        side = "varprobe" if "/varprobe/" in f.filename else "model"
        found[side].append(f"{Path(f.filename).name}:{f.lineno} {f.name}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)


def probe(e: corpus.Entry, device: str, tf32: bool,
          found: dict[str, list[str]] | None = None) -> tuple[varprobe.Report, float, bool]:
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default for matmul
    model, x = e.build(), e.example()
    before = snapshot(model)
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with waits(found) if found is not None else contextlib.nullcontext():
        report = varprobe.probe(model, x, batch_size=e.batch_size, device=device)
    return report, time.perf_counter() - start, as_found(model, before)


def compare(e: corpus.Entry, device: str) -> dict[str, Any]:
    row: dict[str, Any] = {"name": e.name, "family": e.family}
    try:
        cpu, row["cpu_s"], cpu_kept = probe(e, "cpu", False)
        found: dict[str, list[str]] = {"varprobe": [], "model": []}
        gpu, row["gpu_s"], gpu_kept = probe(e, device, False, found)
        tf32, _, _ = probe(e, device, True)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        return row
    a, b = variances(cpu), variances(gpu)
    diffs = sorted(relative(a[k], b[k]) for k in a.keys() & b.keys())
    row.update(
        dropout=any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                    for m in e.build().modules()),
        compared=len(diffs), only_one_side=len(a.keys() ^ b.keys()),
        max_rel=diffs[-1] if diffs else None,
        median_rel=diffs[len(diffs) // 2] if diffs else None,
        verdicts=[cpu.summary.verdict, gpu.summary.verdict, tf32.summary.verdict],
        same_flags=flag_set(cpu) == flag_set(gpu),
        same_flags_tf32=flag_set(cpu) == flag_set(tf32),
        flags_cpu=flag_set(cpu), flags_gpu=flag_set(gpu), flags_tf32=flag_set(tf32),
        kept=cpu_kept and gpu_kept, varprobe_waits=sorted(set(found["varprobe"])),
        model_waits=len(found["model"]))
    return row


def interleaved(entries: list[corpus.Entry]) -> list[corpus.Entry]:
    """One of each family in turn, so that a run cut short still covers every family."""
    seen: dict[str, int] = {}
    rank = [seen.__setitem__(e.family, seen.get(e.family, -1) + 1) or seen[e.family]
            for e in entries]
    return [e for _, _, e in sorted(zip(rank, range(len(entries)), entries),
                                    key=lambda t: t[:2])]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.devices", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=float("inf"),
                        help="stop starting new networks after this long")
    parser.add_argument("--names", type=lambda t: set(t.split(",")), default=None,
                        help="only these networks, comma-separated")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N networks")
    parser.add_argument("--output", type=Path, default=Path("devices.jsonl"))
    args = parser.parse_args()
    print(machine.key([torch.device(args.device)]))
    start = time.perf_counter()
    chosen = [e for e in interleaved(corpus.entries())
              if args.names is None or e.name in args.names][args.skip:]
    with args.output.open("w") as out:
        for e in chosen:
            if time.perf_counter() - start > args.seconds:
                print("stopped: out of time")
                break
            row = compare(e, args.device)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{e.name:28} " + (row.get("error") or
                  f"max rel {row['max_rel'] or 0:.1e} flags same {row['same_flags']} "
                  f"tf32 {row['same_flags_tf32']} kept {row['kept']} "
                  f"dropout {row['dropout']} cpu {row['cpu_s']:.2f}s gpu {row['gpu_s']:.2f}s "
                  f"waits: varprobe {row['varprobe_waits']} model {row['model_waits']}"))


if __name__ == "__main__":
    main()
