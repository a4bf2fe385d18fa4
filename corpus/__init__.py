"""The calibration corpus: real architectures at their own init, and broken variants.

Every entry is a network someone trains (built from its library's own code at a tiny
config, or a faithful hand-written version of its family) or a broken variant of one
that differs from its healthy twin in exactly one known place. The verdict rules are
judged on this corpus: no error on a network that trains, an error naming the right
mechanism and culprit on a broken one. Whether a network trains is decided by training
it (bench/labels.py, labels in corpus/labels/<module>.json), never by varprobe.

    from corpus import ENTRIES, entry
    e = entry("resnet50")
    model = e.build()                     # seeded: the same weights every time
    x = e.inputs(e.batch_size)            # what the probe feeds it
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# modules of this package that register entries
FAMILIES = ("cnn", "cnn_modern", "vision", "hf_text", "hf_vision", "hf_diffusers",
            "handwritten", "broken", "zeros")
OPTIONAL = ("transformers", "diffusers")  # libraries a family may need
LABELS = Path(__file__).resolve().parent / "labels"  # bench/labels.py writes them


@dataclass(frozen=True)
class Entry:
    """One corpus network.

    name: unique id. family: where it comes from ("torchvision-style", "timm-style",
    "transformers", "diffusers", "nanoGPT", "hand-written", ...).
    make: builds the model (called under a fixed seed by ``build``).
    inputs: ``inputs(batch_size)`` -> a tensor, a tuple (positional) or a dict (keywords),
    at the size the network is trained at. batch_size: the probe's batch.
    task: what bench/labels.py trains it on: "classify" (the output's last dim holds
    class logits), "lm" (next-token logits over ``vocab``), "regress" (match a fixed
    random target of the output's shape).
    broken: the mechanism that breaks it (None: a network that trains from its init).
    culprits: module names an error must name for a broken entry.
    twin: the name of the entry it differs from in exactly one place.
    """

    name: str
    family: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int], Any]
    batch_size: int = 8
    task: str = "classify"
    vocab: int | None = None
    broken: str | None = None
    culprits: tuple[str, ...] = ()
    twin: str | None = None
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def build(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.make()

    def example(self, batch_size: int | None = None, seed: int = 0) -> Any:
        with torch.random.fork_rng():
            torch.manual_seed(10_000 + seed)
            return self.inputs(batch_size or self.batch_size)


ENTRIES: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.name in ENTRIES:
        raise ValueError(f"corpus entry {entry.name!r} registered twice")
    ENTRIES[entry.name] = entry
    return entry


def _load() -> None:
    for family in FAMILIES:
        try:
            importlib.import_module(f"corpus.{family}")
        except ModuleNotFoundError as exc:
            # a family whose library is not installed (the hf extra) adds no entries
            if exc.name not in (f"corpus.{family}", *OPTIONAL):
                raise


def entries(healthy: bool | None = None) -> list[Entry]:
    _load()
    found = list(ENTRIES.values())
    if healthy is not None:
        found = [e for e in found if (e.broken is None) == healthy]
    return found


def entry(name: str) -> Entry:
    _load()
    return ENTRIES[name]


def trains(name: str) -> dict[str, bool] | None:
    """Whether ``name`` trained in bench/labels.py's runs, {"sgd": ..., "adamw": ...};
    None when it has no label. Read from corpus/labels, which only training writes."""
    return _labels().get(name)


@functools.cache
def _labels() -> dict[str, dict[str, bool]]:
    found = {}
    for path in sorted(LABELS.glob("*.json")):
        for name, r in json.loads(path.read_text()).items():
            found[name] = {opt: r[opt]["trains"] for opt in ("sgd", "adamw")}
    return found
