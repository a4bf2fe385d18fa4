"""Training labels for the calibration corpus: does each entry actually train?

varprobe's verdicts are judged against these labels, so they come from training, never
from varprobe. The protocol, the same for every entry:

* Data: a fixed set of 64 examples, ``e.example(64, seed=1)``. Image inputs of 128x128
  or more are resized (area interpolation) to ``--size`` (default 32x32, what a shared
  CPU affords) and trained there, which the globally pooled (and the fully
  convolutional) families accept; ``resolution`` in the labels says what was used (the
  native size when the model refuses the smaller one).
* Task (``e.task``), one its healthy twin can fit in the budget:
  - "classify": 4 classes (fewer when the output has fewer logits), 16 examples each.
    The class is made visible in the main input at the input's own scale: floating
    inputs get a fixed per-class offset along dim 1 (channels, features, mel bins) of
    the input's std, broadcast over positions (raw pixels stay raw pixels); token inputs
    draw each class's tokens from its own quarter of the vocabulary. Cross-entropy on
    the output's last dimension (every position gets its example's class).
  - "lm": the integer input (``input_ids``, and ``decoder_input_ids`` of an
    encoder-decoder) is replaced by sequences drawn from a fixed random Markov chain
    over ``e.vocab`` in which each token has two likely successors (probability 0.45
    each, the remaining 0.1 spread uniformly); next-token cross-entropy on the output.
  - "regress": the classes above in the input; MSE to a fixed N(0, 1) vector per class
    along the output's channel axis (dim 1 of an image or video map, else the last),
    broadcast over positions, on the raw output (an output at the wrong scale is part
    of what is being judged).
* chance: the loss of the best constant output: ln(classes) for "classify", ln(vocab)
  for "lm", the targets' variance across examples for "regress".
* Optimizers: SGD (momentum 0.9) at learning rates 0.1, 0.03, 0.01, 0.003 and AdamW
  (weight decay 0.01) at 3e-3, 1e-3, 3e-4, each from a fresh ``e.build()``, for at most
  ``--steps`` steps of batch ``--batch`` (default 8), the 64 examples in a
  fixed shuffled order per epoch, the model in train mode, no gradient clipping.
  The default budget is 60 steps, 150 for "lm" (bigram statistics over a vocabulary of
  thousands take more steps to show than four visible classes).
  The rates are tried in that order and an optimizer's grid stops at the first rate
  that trains (``runs`` lists every rate tried, with its steps).
* trains = the mean of the last 5 losses reaches half the chance loss (a run stops
  there); a non-finite loss stops the run: it does not train. Measured against chance,
  not the initial loss, so a network whose initial loss is huge cannot pass by halving
  it. ``initial`` (the mean minibatch loss at the built weights) is recorded beside.

Output: corpus/labels/<module>.json (one file per corpus module, so that runs over
different modules never collide; entries already there and not re-run are kept), per
entry {protocol, task, resolution, size, chance, steps, batch, seconds, sgd: {trains,
best_lr, initial, final, runs}, adamw: {...}}, and a Markdown table on stdout.

    python -m bench.labels [--only NAME,...] [--module cnn] [--steps 60] [--batch 8]
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
GOAL = 0.5  # trains: the last 5 losses average at most GOAL x the chance loss
STEPS = {"classify": 60, "regress": 60, "lm": 150}  # by task, unless --steps says
PROTOCOL = 2  # bumped when the task or the criterion changes
CLASSES = 4  # classes of the "classify" and "regress" tasks
GRIDS = {"sgd": (0.1, 0.03, 0.01, 0.003), "adamw": (3e-3, 1e-3, 3e-4)}
LABEL_DIR = corpus.LABELS


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
        seq[..., t] = torch.multinomial(probs[seq[..., t - 1].reshape(-1)], 1, generator=gen).view(
            shape[:-1]
        )
    return seq


def _with_tokens(inputs: Any, tokens: torch.Tensor) -> Any:
    if isinstance(inputs, dict):
        # an encoder-decoder reads the chain on both sides: the decoder predicts its
        # own next token (teacher forcing), as a decoder-only model does
        both = {"decoder_input_ids": tokens} if "decoder_input_ids" in inputs else {}
        return {**inputs, "input_ids": tokens, **both}
    if isinstance(inputs, tuple):
        return (tokens, *inputs[1:])
    return tokens


def _tokens(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return inputs["input_ids"]
    return inputs[0] if isinstance(inputs, tuple) else inputs


def _main_key(inputs: Any) -> Any:
    """Where the main input sits: a dict key, a tuple index, or None (the input itself)."""
    if isinstance(inputs, dict):
        return next(k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim())
    return 0 if isinstance(inputs, tuple) else None


def _replace(inputs: Any, key: Any, value: torch.Tensor) -> Any:
    if key is None:
        return value
    if isinstance(inputs, dict):
        return {**inputs, key: value}
    return (*inputs[:key], value, *inputs[key + 1 :])


def _show_classes(x: torch.Tensor, y: torch.Tensor, vocab: int | None, gen) -> torch.Tensor:
    """The main input with each example's class made visible at the input's own scale.

    Floating inputs: a per-class offset along dim 1 (channels, features, mel bins),
    broadcast over the other dims, of the input's own std; so the input keeps its scale
    (raw pixels stay raw pixels) and the class is readable at every position.
    Token inputs: each class draws its tokens from its own quarter of the vocabulary."""
    k = int(y.max()) + 1
    if not x.is_floating_point():
        band = max(1, (vocab or int(x.max()) + 1) // k)
        return y.view(-1, *[1] * (x.dim() - 1)) * band + torch.randint(
            band, x.shape, generator=gen
        )
    width = x.shape[1] if x.dim() > 1 else 1
    offsets = torch.randn(k, width, generator=gen).to(x.dtype)
    shift = offsets[y].view((x.shape[0], width, *[1] * (x.dim() - 2))[: x.dim()])
    return x + x.std() * shift


def _class_targets(y: torch.Tensor, shape: torch.Size, gen) -> torch.Tensor:
    """Regression targets: a fixed N(0, 1) vector per class along the output's channel
    axis (dim 1 of an image or video map, the last dim otherwise), broadcast over
    positions: a target any network that can read the class can fit, convolutional ones
    included."""
    axis = 0 if len(shape) >= 3 else len(shape) - 1  # per-example dims
    vectors = torch.randn(int(y.max()) + 1, shape[axis], generator=gen)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return vectors[y].view(-1, *view).expand(-1, *shape).clone()


@dataclasses.dataclass
class Task:
    inputs: Any
    loss: Any  # loss(output_tensor, idx) -> scalar
    resolution: str
    chance: float  # the loss of the best constant output


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
        return Task(
            inputs,
            lambda out, idx: F.cross_entropy(
                out[:, :-1].reshape(-1, out.shape[-1]), tokens[idx][:, 1:].reshape(-1)
            ),
            resolution,
            math.log(e.vocab),
        )
    with torch.no_grad():
        shape = _output(_call(e.build(), _take(inputs, torch.arange(2), N_EXAMPLES))).shape[1:]
    classes = min(CLASSES, shape[-1]) if e.task == "classify" else CLASSES
    y = (torch.arange(N_EXAMPLES) % classes)[torch.randperm(N_EXAMPLES, generator=gen)]
    key = _main_key(inputs)
    main = inputs[key] if key is not None else inputs
    inputs = _replace(inputs, key, _show_classes(main, y, e.vocab, gen))
    if e.task == "classify":
        labels = y.view(-1, *[1] * (len(shape) - 1)).expand(-1, *shape[:-1])
        return Task(
            inputs,
            lambda out, idx: F.cross_entropy(
                out.reshape(-1, out.shape[-1]), labels[idx].reshape(-1)
            ),
            resolution,
            math.log(classes),
        )
    if e.task == "regress":
        target = _class_targets(y, shape, gen)
        return Task(
            inputs,
            lambda out, idx: F.mse_loss(out, target[idx]),
            resolution,
            (target - target.mean(0)).pow(2).mean().item(),
        )
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
        losses = [
            task.loss(_output(_call(model, _take(task.inputs, idx, N_EXAMPLES))), idx).item()
            for idx in torch.arange(N_EXAMPLES).split(batch)
        ]
    return sum(losses) / len(losses)


def train(
    e: corpus.Entry, task: Task, opt: str, lr: float, steps: int, batch: int
) -> tuple[float, int]:
    """The mean of the last 5 losses (nan when a loss is non-finite) and the steps run:
    a run stops early once that mean is at the goal, half the chance loss."""
    model = e.build()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = (
        torch.optim.SGD(params, lr=lr, momentum=0.9)
        if opt == "sgd"
        else torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    )
    losses: list[float] = []
    with torch.random.fork_rng():
        torch.manual_seed(3)  # dropout and stochastic depth draw the same masks every run
        for idx in _batches(steps, batch):
            loss = task.loss(_output(_call(model, _take(task.inputs, idx, N_EXAMPLES))), idx)
            if not torch.isfinite(loss):
                return math.nan, len(losses) + 1
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(loss.item())
            if len(losses) >= 5 and _tail(losses) <= GOAL * task.chance:
                break
    return _tail(losses), len(losses)


def _tail(losses: list[float]) -> float:
    return sum(losses[-5:]) / len(losses[-5:])


def label(
    e: corpus.Entry, steps: int | None, batch: int, size: int = TRAIN_SIZE
) -> dict[str, Any]:
    start = time.perf_counter()
    steps = steps or STEPS[e.task]
    task = make_task(e, size)
    initial = initial_loss(e, task, batch)
    result: dict[str, Any] = {
        "protocol": PROTOCOL,
        "task": e.task,
        "resolution": task.resolution,
        "steps": steps,
        "batch": batch,
        "size": size,
        "chance": task.chance,
    }
    for opt, grid in GRIDS.items():
        runs: dict[str, Any] = {}
        for lr in grid:
            final, ran = train(e, task, opt, lr, steps, batch)
            runs[str(lr)] = {"final": None if math.isnan(final) else final, "steps": ran}
            if not math.isnan(final) and final <= GOAL * task.chance:
                break
        finals = {lr: r["final"] for lr, r in runs.items() if r["final"] is not None}
        best = min(finals, key=finals.get) if finals else None
        final = finals.get(best)
        result[opt] = {
            "trains": bool(final is not None and final <= GOAL * task.chance),
            "best_lr": None if best is None else float(best),
            "initial": initial if math.isfinite(initial) else None,
            "final": final,
            "runs": runs,
        }
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
    return (
        f"{'yes' if r['trains'] else 'NO'} {fmt(r['initial'])}->{fmt(r['final'])} @{r['best_lr']}"
    )


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| entry | task | resolution | chance | SGD | AdamW | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['task']} | {r['resolution']} | {r['chance']:.3g} | {_cell(r['sgd'])} | "
            f"{_cell(r['adamw'])} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.labels", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", default="", help="comma-separated entry names, run in this order")
    parser.add_argument(
        "--module", default="", help="comma-separated corpus modules (e.g. cnn,broken)"
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: by task)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--size", type=int, default=TRAIN_SIZE, help="training size of large images"
    )
    parser.add_argument(
        "--skip-done",
        action="store_true",
        help="skip entries already labelled at the same steps, batch and size",
    )
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
        if (
            args.skip_done
            and (old.get("protocol"), old.get("steps"), old.get("batch"))
            == (PROTOCOL, args.steps or STEPS[corpus.ENTRIES[name].task], args.batch)
            and (old.get("resolution") == "native" or old.get("size") == args.size)
        ):
            continue
        done[name] = label(corpus.ENTRIES[name], args.steps, args.batch, args.size)
        # read again just before writing: another run may have labelled other entries meanwhile
        write_atomic(path, {**_read(path), name: done[name]})
        print(
            f"{name}: {_cell(done[name]['sgd'])} | {_cell(done[name]['adamw'])} "
            f"({done[name]['seconds']} s)",
            file=sys.stderr,
            flush=True,
        )
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
