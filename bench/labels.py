"""Training labels for the calibration corpus: does each entry actually train?

varprobe's verdicts are judged against these labels, so they come from training, never
from varprobe. The protocol, the same for every entry:

* Data: a fixed set of 64 examples, ``e.example(64, seed=1)``. Image inputs of 128x128
  or more are resized (area interpolation) to ``--size`` (default 32x32, what a shared
  CPU affords) and trained there, which the globally pooled (and the fully
  convolutional) families accept; ``resolution`` in the labels says what was used (the
  native size when the model refuses the smaller one).
* Task (``e.task``):
  - "classify": a fixed random label per example (and per position, for a sequence
    output) over the output's last dimension, cross-entropy: memorize them.
  - "lm": the integer input (``input_ids``) is replaced by sequences drawn from a fixed
    random Markov chain over ``e.vocab`` in which each token has two likely successors
    (probability 0.45 each, the remaining 0.1 spread uniformly); next-token
    cross-entropy.
  - "regress": MSE to a fixed N(0, 1) target of the output's shape, on the raw output
    (no rescaling: an output at the wrong scale is part of what is being judged).
* Optimizers: SGD (momentum 0.9) at learning rates 0.1, 0.03, 0.01 and AdamW (weight
  decay 0.01) at 3e-3, 1e-3, 3e-4, each from a fresh ``e.build()``, for ``--steps``
  steps (default 40) of batch ``--batch`` (default 8), the 64 examples in a fixed
  shuffled order per epoch, the model in train mode, no gradient clipping.
  The rates are tried in that order and an optimizer's grid stops at the first rate
  that trains (the label is the same; ``runs`` lists every rate tried).
* chance (recorded, not part of the criterion): the loss of the best constant output,
  ln(classes) for "classify", ln(vocab) for "lm", mean(target^2) for "regress"; an entry
  whose initial loss is far above it can halve its loss and still predict nothing.
* initial: the mean minibatch loss over the 64 examples at the built weights (no
  update); final: the mean of the last 5 steps' losses.
  trains = final <= 0.5 x initial, both finite. A non-finite loss stops the run: it does
  not train.

Output: corpus/labels/<module>.json (one file per corpus module, so that runs over
different modules never collide; entries already there and not re-run are kept), per
entry {task, resolution, size, chance, steps, batch, seconds, sgd: {trains, best_lr,
initial, final, runs}, adamw: {...}}, and a Markdown table on stdout.

    python -m bench.labels [--only NAME,...] [--module cnn] [--steps 40] [--batch 8]
                           [--size 32] [--skip-done]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import corpus

N_EXAMPLES, TRAIN_SIZE, MIN_RESIZE = 64, 32, 128  # TRAIN_SIZE: the default of --size
GRIDS = {"sgd": (0.1, 0.03, 0.01), "adamw": (3e-3, 1e-3, 3e-4)}
LABEL_DIR = Path(__file__).resolve().parent.parent / "corpus" / "labels"


# -- inputs, outputs and targets ---------------------------------------------------------

def _map(inputs: Any, fn) -> Any:
    """Apply ``fn`` to every tensor of a tensor / tuple / dict input."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, dict):
        return {k: _map(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_map(v, fn) for v in inputs)
    return inputs


def _take(inputs: Any, idx: torch.Tensor, n: int) -> Any:
    return _map(inputs, lambda t: t[idx] if t.dim() and t.shape[0] == n else t)


def _call(model, inputs: Any):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _output(out: Any) -> torch.Tensor:
    """The tensor a task's loss reads: logits / sample of a library output, else the
    first floating tensor."""
    for key in ("logits", "sample"):
        found = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(found, torch.Tensor):
            return found
    if isinstance(out, torch.Tensor):
        return out
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif isinstance(out, dict):
        out = list(out.values())
    for item in out:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item
    raise TypeError(f"no floating tensor in the output ({type(out).__name__})")


def _resize(inputs: Any, size: int) -> tuple[Any, bool]:
    """Large images shrunk to ``size``, and whether there were any."""
    shrunk = []

    def shrink(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dim() == 4 and min(t.shape[-2:]) >= MIN_RESIZE:
            shrunk.append(t)
            return F.interpolate(t, size=(size, size), mode="area")
        return t
    return _map(inputs, shrink), bool(shrunk)


def _markov(vocab: int, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Sequences from a fixed chain: two likely successors per token (0.45 each)."""
    probs = torch.full((vocab, vocab), 0.1 / vocab)
    likely = torch.randint(vocab, (vocab, 2), generator=gen)
    probs.scatter_add_(1, likely, torch.full((vocab, 2), 0.45))
    seq = torch.empty(shape, dtype=torch.long)
    seq[..., 0] = torch.randint(vocab, shape[:-1], generator=gen)
    for t in range(1, shape[-1]):
        seq[..., t] = torch.multinomial(probs[seq[..., t - 1].reshape(-1)], 1, generator=gen).view(shape[:-1])
    return seq


def _with_tokens(inputs: Any, tokens: torch.Tensor) -> Any:
    if isinstance(inputs, dict):
        return {**inputs, "input_ids": tokens}
    if isinstance(inputs, tuple):
        return (tokens, *inputs[1:])
    return tokens


def _tokens(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return inputs["input_ids"]
    return inputs[0] if isinstance(inputs, tuple) else inputs


@dataclasses.dataclass
class Task:
    inputs: Any
    loss: Any  # loss(output_tensor, idx) -> scalar
    resolution: str
    chance: float  # the loss of the best constant guess: ln(classes), or mean(target^2)


def make_task(e: corpus.Entry, size: int = TRAIN_SIZE) -> Task:
    """The fixed data and loss of ``e``'s task (module docstring)."""
    gen = torch.Generator().manual_seed(1)
    inputs = e.example(N_EXAMPLES, seed=1)
    resolution = "native"
    small, shrunk = _resize(inputs, size)
    if shrunk and _fits(e, small):
        inputs, resolution = small, f"{size}x{size}"
    if e.task == "lm":
        tokens = _markov(e.vocab, _tokens(inputs).shape, gen)
        inputs = _with_tokens(inputs, tokens)
        return Task(inputs, lambda out, idx: F.cross_entropy(
            out[:, :-1].reshape(-1, out.shape[-1]), tokens[idx][:, 1:].reshape(-1)), resolution,
            math.log(e.vocab))
    with torch.no_grad():
        shape = _output(_call(e.build(), _take(inputs, torch.arange(2), N_EXAMPLES))).shape[1:]
    if e.task == "classify":
        labels = torch.randint(shape[-1], (N_EXAMPLES, *shape[:-1]), generator=gen)
        return Task(inputs, lambda out, idx: F.cross_entropy(
            out.reshape(-1, out.shape[-1]), labels[idx].reshape(-1)), resolution, math.log(shape[-1]))
    if e.task == "regress":
        target = torch.randn((N_EXAMPLES, *shape), generator=gen)
        return Task(inputs, lambda out, idx: F.mse_loss(out, target[idx]), resolution,
                    target.pow(2).mean().item())
    raise ValueError(f"{e.name}: unknown task {e.task!r}")


def _fits(e: corpus.Entry, small: Any) -> bool:
    try:
        with torch.no_grad():
            _call(e.build(), _take(small, torch.arange(2), N_EXAMPLES))
        return True
    except Exception:  # a model fixed to its native size
        return False


# -- training ------------------------------------------------------------------------------

def _batches(steps: int, batch: int) -> list[torch.Tensor]:
    gen, order = torch.Generator().manual_seed(2), []
    while len(order) < steps:
        perm = torch.randperm(N_EXAMPLES, generator=gen)
        order += list(perm.split(batch))
    return order[:steps]


def initial_loss(e: corpus.Entry, task: Task, batch: int) -> float:
    model = e.build()
    with torch.no_grad():
        losses = [task.loss(_output(_call(model, _take(task.inputs, idx, N_EXAMPLES))), idx).item()
                  for idx in torch.arange(N_EXAMPLES).split(batch)]
    return sum(losses) / len(losses)


def train(e: corpus.Entry, task: Task, opt: str, lr: float, steps: int, batch: int) -> float:
    """The mean of the last 5 losses (nan when a loss is non-finite)."""
    model = e.build()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = (torch.optim.SGD(params, lr=lr, momentum=0.9) if opt == "sgd"
             else torch.optim.AdamW(params, lr=lr, weight_decay=0.01))
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(3)  # dropout and stochastic depth draw the same masks every run
        for idx in _batches(steps, batch):
            loss = task.loss(_output(_call(model, _take(task.inputs, idx, N_EXAMPLES))), idx)
            if not torch.isfinite(loss):
                return math.nan
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(loss.item())
    tail = losses[-5:]
    return sum(tail) / len(tail)


def label(e: corpus.Entry, steps: int, batch: int, size: int = TRAIN_SIZE) -> dict[str, Any]:
    start = time.perf_counter()
    task = make_task(e, size)
    initial = initial_loss(e, task, batch)
    result: dict[str, Any] = {"task": e.task, "resolution": task.resolution, "steps": steps,
                              "batch": batch, "size": size, "chance": task.chance}
    for opt, grid in GRIDS.items():
        runs, best = {}, None
        for lr in grid:
            final = train(e, task, opt, lr, steps, batch)
            runs[str(lr)] = None if math.isnan(final) else final
            if not math.isnan(final) and (best is None or final < runs[str(best)]):
                best = lr
            if best is not None and runs[str(best)] <= 0.5 * initial:
                break
        final = None if best is None else runs[str(best)]
        result[opt] = {"trains": bool(final is not None and math.isfinite(initial)
                                      and final <= 0.5 * initial),
                       "best_lr": best, "initial": initial if math.isfinite(initial) else None,
                       "final": final, "runs": runs}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# -- where entries live, output ------------------------------------------------------------

def modules() -> dict[str, list[str]]:
    """Corpus module -> the entries it registers (imported in FAMILIES order)."""
    found: dict[str, list[str]] = {}
    for family in corpus.FAMILIES:
        before = set(corpus.ENTRIES)
        try:
            importlib.import_module(f"corpus.{family}")
        except ModuleNotFoundError as exc:
            if exc.name != f"corpus.{family}":
                raise
            continue
        found[family] = [n for n in corpus.ENTRIES if n not in before]
    return found


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def _cell(r: dict) -> str:
    fmt = lambda v: "nan" if v is None else f"{v:.3g}"  # noqa: E731
    return f"{'yes' if r['trains'] else 'NO'} {fmt(r['initial'])}->{fmt(r['final'])} @{r['best_lr']}"


def table(rows: dict[str, dict]) -> str:
    lines = ["| entry | task | resolution | chance | SGD | AdamW | s |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['task']} | {r['resolution']} | {r['chance']:.3g} | {_cell(r['sgd'])} | "
                     f"{_cell(r['adamw'])} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.labels", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated entry names, run in this order")
    parser.add_argument("--module", default="", help="comma-separated corpus modules (e.g. cnn,broken)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=TRAIN_SIZE, help="training size of large images")
    parser.add_argument("--skip-done", action="store_true",
                        help="skip entries already labelled at the same steps, batch and size")
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    wanted = {m for m in args.module.split(",") if m}
    by_module = modules()
    home = {n: m for m, names in by_module.items() for n in names}
    unknown = set(only) - set(home) | wanted - set(by_module)
    if unknown:
        print(f"unknown corpus entry or module: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    names = only or [n for n, m in home.items() if not wanted or m in wanted]
    names = [n for n in names if not wanted or home[n] in wanted]
    done: dict[str, dict] = {}
    for name in names:
        path = LABEL_DIR / f"{home[name]}.json"
        old = _read(path).get(name, {})
        if args.skip_done and (old.get("steps"), old.get("batch")) == (args.steps, args.batch) and (
                old.get("resolution") == "native" or old.get("size") == args.size):
            continue
        done[name] = label(corpus.ENTRIES[name], args.steps, args.batch, args.size)
        # read again just before writing: another run may have labelled other entries meanwhile
        write_atomic(path, {**_read(path), name: done[name]})
        print(f"{name}: {_cell(done[name]['sgd'])} | {_cell(done[name]['adamw'])} "
              f"({done[name]['seconds']} s)", file=sys.stderr, flush=True)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
