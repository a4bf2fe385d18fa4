"""``python -m bench``: the probe's cost beside a bare pass and the peer loggers, at each
thread count, end to end on a ResNet-50, and the 175B predict; writes RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from bench import e2e, machine, overhead, results, scale

RESULTS = Path(__file__).with_name("RESULTS.md")


def thread_counts(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=thread_counts, default=[1, 2],
                        help="torch intra-op thread counts, comma-separated (default 1,2)")
    parser.add_argument("--e2e-rounds", type=int, default=3,
                        help="rounds of the end-to-end ResNet-50 commands (0: skip them)")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 175B predict")
    parser.add_argument("--malloc-as-is", action="store_true",
                        help="leave glibc's malloc returning freed memory to the OS "
                             "(page faults make both sides noisier)")
    parser.add_argument("--devices", type=lambda t: [d for d in t.split(",") if d.strip()],
                        default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
                        help="where the models run, comma-separated (default cpu, and "
                             "cuda where available)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    info = machine.info()
    info["malloc"] = "as is" if args.malloc_as_is else machine.keep_freed_memory()
    devices = [torch.device(d) for d in args.devices]
    key = machine.key(devices)
    print(f"{key}\nload average {machine.load()}")
    blocks = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        block = {"threads": threads, "load_before": machine.load(), "rows": []}
        for device in devices:
            block["rows"] += overhead.run(device, args.repeats, args.warmup)
        if args.e2e_rounds:
            block["e2e"] = e2e.run(threads, args.e2e_rounds, overhead.numba_installed(),
                                   devices[-1].type)
        block["load_after"] = machine.load()
        blocks.append(block)
    big = None if args.skip_scale else scale.run()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = {"when": when, "info": info, "threads": blocks, "big": big,
           "command": "python -m bench " + " ".join(sys.argv[1:])}
    results.write(args.output, key, run)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
