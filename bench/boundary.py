"""Where training stops: dose-response sweeps that place the verdict's error thresholds.

The corpus has one or two broken variants per mechanism, which says on which side of a
threshold a network falls but not where the edge lies. Here each mechanism is swept by
one knob, from harmless to broken, on the corpus's own networks, and every point is
labelled by training it (bench/labels.py's protocol: the same task, data, budget and
SGD grid) and probed by varprobe at default settings:

* ``vgg_conv``: VGG-11 (no BatchNorm) with ``features.8`` (the 5th conv) scaled by c:
  the signal after it, and every weight gradient on the path through it, grow c times;
* ``vgg_stem``: the same with the stem conv scaled;
* ``vgg_gain``: every conv of that VGG-11 at g^2 times its variance (the growth
  compounds, g^2 per conv);
* ``tanh``: a 30-layer tanh MLP at weight variance sigma_w^2 / n_in (1 is critical,
  past it the chaotic phase, where the gradient grows along the stack);
* ``tied_lm``: sample_models/transformer_block.py (two pre-LN blocks, an LM head tied
  to the embedding) with the embedding drawn at that std: the logits' E[y^2] is
  about 128 std^2 (the head reads LayerNorm's unit-scale output);
* ``mlp3_input``: a 3-layer He ReLU MLP fed inputs at std s (a bias-free ReLU stack is
  1-homogeneous, so the logits' E[y^2] grows as s^2);
* ``relu_gain``: a 20-layer ReLU MLP at g^2 times He's variance (the signal and the
  gradient grow g^2 per layer).
* ``mnasnet_head``: torchvision's MNASNet 0.5 built for 10 classes on 64x64 images, its
  head (kaiming_uniform_ fan_out: Var[w] = 1/10) scaled by k: a classifier head's own
  excess over normalized, pooled features (E[y^2] ~ 200 k^2 times theirs).

For each point: the largest forward ratio varprobe judges (a weight layer's input, or
the last layer's output, over its reference's: ``diagnose.forward.points``), the
largest backward product along a chain (``diagnose.backward``), the errors at default
thresholds, and whether SGD trains it and at which rate. docs/flags.md reads the edges
off the table this writes.

    python -m bench.boundary [--families vgg_conv,tanh] [--out bench/BOUNDARY.md]
    python -m bench.boundary --probe-only      # new thresholds, the same training labels
"""

from __future__ import annotations

import argparse
import json
import math
import runpy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import corpus
import varprobe
from bench import labels
from corpus import broken
from corpus.cnn_modern import MNASNet
from varprobe.diagnose import backward, forward
from varprobe.diagnose.common import is_weight
from varprobe.diagnose.thresholds import Thresholds

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "sample_models"


@dataclass(frozen=True)
class Family:
    name: str
    knob: str
    values: tuple[float, ...]
    make: Callable[[float], Callable[[], nn.Module]]
    inputs: Callable[[int], torch.Tensor]
    batch_size: int
    task: str = "classify"
    vocab: int | None = None
    inputs_for: Callable[[float], Callable[[int], torch.Tensor]] | None = None  # by knob


def _tanh(s2: float) -> Callable[[], nn.Module]:
    return lambda: broken.mlp(30, nn.Tanh, lambda fi, fo: math.sqrt(s2 / fi))


def _tied_lm(std: float) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = runpy.run_path(str(SAMPLES / "transformer_block.py"))["model"]
        nn.init.normal_(model.embed.weight, std=std)
        return model
    return make


def _scaled(s: float) -> Callable[[int], torch.Tensor]:
    return lambda batch: s * broken.vectors(batch)


def _mnasnet_head(k: float) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = MNASNet(0.5, num_classes=10)
        with torch.no_grad():
            model.classifier[1].weight.mul_(k)
        return model
    return make


def _relu(g2: float) -> Callable[[], nn.Module]:
    return lambda: broken.mlp(20, nn.ReLU, lambda fi, fo: math.sqrt(g2) * broken.HE(fi, fo))


FAMILIES = {
    f.name: f
    for f in (
        Family("vgg_conv", "c (features.8 x c)", (3, 10, 20, 30, 50, 70, 100, 150),
               lambda c: lambda: broken.vgg11({"features.8": c}), broken.C32, 8),
        Family("vgg_stem", "c (features.0 x c)", (10, 30, 50, 70, 100),
               lambda c: lambda: broken.vgg11({"features.0": c}), broken.C32, 8),
        Family("vgg_gain", "g^2 (every conv x g)", (1.5, 2, 2.5, 3, 4),
               lambda g2: lambda: broken.vgg11(he_gain=math.sqrt(g2)), broken.C32, 8),
        Family("tanh", "sigma_w^2", (1.5, 2, 3, 4, 6, 8, 16), _tanh, broken.vectors, 16),
        Family("tied_lm", "embedding std", (0.02, 0.1, 0.3, 0.5, 1.0), _tied_lm,
               lambda b: torch.randint(1000, (b, 32)), 8, "lm", 1000),
        Family("mlp3_input", "input std s (E[x^2] = s^2)", (1, 3, 5, 10, 30),
               lambda s: lambda: broken.mlp(3, nn.ReLU, broken.HE), broken.vectors, 16,
               inputs_for=_scaled),
        Family("relu_gain", "g^2 (x He)", (1.25, 1.5, 2, 2.5, 3, 4), _relu,
               broken.vectors, 16),
        Family("mnasnet_head", "k (the 10-class head x k)", (1, 2, 3.16), _mnasnet_head,
               lambda b: torch.randn(b, 3, 64, 64), 4),
    )
}


def chain_products(layers, stretch: float) -> list[float]:
    """Every product diagnose.backward judges: along each chain, from a layer at least
    ``stretch`` units below its top to the top."""
    found = []
    for run in backward.runs(layers, backward.units(layers)):
        product = 1.0
        for k in range(len(run) - 1, -1, -1):
            if k < len(run) - 1 and len(run) - k >= stretch:
                found.append(product)
            if run[k].factor is not None:
                product *= run[k].factor
    return [p for p in found if p > 0]


def measure(e: corpus.Entry) -> dict:
    """varprobe's view at default settings: the extreme judged ratios and the errors."""
    report = varprobe.probe(e.build(), e.example(), batch_size=e.batch_size)
    t = Thresholds()
    weights = [i for i, layer in enumerate(report.layers) if is_weight(layer)]
    points = [p[2] for p in forward.points(report, weights, t.stretch)]
    products = chain_products(report.layers, t.stretch)
    return {
        "forward_max": max(points, default=None),
        "backward_max": max(products, default=None),
        "errors": sorted({f.code for layer in report.layers for f in layer.flags
                          if f.severity == "error"}),
    }


def entry(family: Family, value: float) -> corpus.Entry:
    inputs = family.inputs_for(value) if family.inputs_for else family.inputs
    return corpus.Entry(f"{family.name}={value:g}", "sweep", family.make(value), inputs,
                        family.batch_size, family.task, family.vocab)


def point(family: Family, value: float) -> dict:
    e = entry(family, value)
    start = time.perf_counter()
    task = labels.make_task(e)
    runs = {}
    for lr in labels.GRIDS["sgd"]:
        final, steps = labels.train(e, task, "sgd", lr, labels.STEPS[e.task], 8)
        runs[str(lr)] = {"final": None if math.isnan(final) else round(final, 4),
                         "steps": steps}
        if not math.isnan(final) and final <= labels.GOAL * task.chance:
            break
    trains = [float(lr) for lr, r in runs.items()
              if r["final"] is not None and r["final"] <= labels.GOAL * task.chance]
    return {"family": family.name, "value": value, **measure(e),
            "sgd_trains": bool(trains), "sgd_lr": trains[0] if trains else None,
            "runs": runs, "seconds": round(time.perf_counter() - start, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| family | knob | value | forward max | backward max | errors | SGD trains "
             "| at lr |", "|---|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        f = FAMILIES[r["family"]]
        num = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        lines.append(f"| {f.name} | {f.knob} | {r['value']:g} | {num(r['forward_max'])} | "
                     f"{num(r['backward_max'])} | {', '.join(r['errors']) or '-'} | "
                     f"{'yes' if r['sgd_trains'] else 'no'} | {num(r['sgd_lr'])} |")
    return "\n".join(lines)


def write(rows: list[dict], out: Path) -> str:
    text = (f"# Where training stops\n\nWritten by `python -m bench.boundary` "
            f"(bench/boundary.py; torch {torch.__version__}, 1 thread). Each row: a network "
            f"of the family at that knob, varprobe's largest judged forward ratio (a weight "
            f"layer's input, or the network output, over its reference's) and backward "
            f"product and its errors at default thresholds, and whether SGD trains it "
            f"(bench/labels.py's task, budget and grid "
            f"{', '.join(map(str, labels.GRIDS['sgd']))}; the first rate that trains). "
            f"`--probe-only` re-probes the points and keeps their training labels.\n\n"
            f"{table(rows)}\n")
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.boundary",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", default=str(HERE / "BOUNDARY.md"))
    parser.add_argument("--probe-only", action="store_true",
                        help="re-probe the points in the existing JSON, keep their labels")
    args = parser.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    if set(names) - set(FAMILIES):
        print(f"unknown family: {', '.join(sorted(set(names) - set(FAMILIES)))} "
              f"(valid: {', '.join(FAMILIES)})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.probe_only:
        rows = json.loads(out.with_suffix(".json").read_text())
        for row in rows:
            row.update(measure(entry(FAMILIES[row["family"]], row["value"])))
    else:
        rows = []
        for name in names:
            for value in FAMILIES[name].values:
                rows.append(point(FAMILIES[name], value))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(write(rows, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
