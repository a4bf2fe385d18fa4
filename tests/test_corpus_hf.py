"""The transformers, diffusers and hand-written sequence entries of the calibration corpus
build, take their own inputs, give the output their task says, and probe without an error
inside varprobe. No verdict is asserted here: the corpus exists to judge the verdicts.
A family whose library is not installed is skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import pytest
import torch

import corpus
import varprobe

# Entries varprobe cannot probe yet: the reason is varprobe's, so the test says so and
# turns red (strict) the day it is fixed.
KNOWN: dict = {}

# module of corpus -> the library it needs (None: torch alone)
MODULES = {"hf_text": "transformers", "hf_vision": "transformers",
           "hf_diffusers": "diffusers", "handwritten": None}


def made_in(e: corpus.Entry) -> str:
    return getattr(e.make, "__module__", "").rpartition(".")[2]


def params() -> list:
    found = []
    for module, lib in MODULES.items():
        if lib and importlib.util.find_spec(lib) is None:
            found.append(pytest.param(None, id=module,
                                      marks=pytest.mark.skip(reason=f"{lib} not installed")))
            continue
        if importlib.util.find_spec(f"corpus.{module}") is None:
            continue
        importlib.import_module(f"corpus.{module}")
        found += [pytest.param(e, id=e.name, marks=KNOWN.get(e.name, ()))
                  for e in corpus.ENTRIES.values() if made_in(e) == module]
    return found


def entries_only(params: list) -> list:
    """For tests that do not probe: the entries whose probe is known to fail included."""
    return [pytest.param(*p.values, id=p.id, marks=[m for m in p.marks if m.name == "skip"])
            for p in params]


ENTRIES = params()
NO_PROBE = entries_only(ENTRIES)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are small: more threads only fight the other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def first_output(out) -> torch.Tensor:
    """The logits (or sample) a task trains on: HF outputs carry them first."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def test_there_are_enough_entries():
    assert len([p for p in ENTRIES if p.values[0] is not None]) >= 22


@pytest.mark.parametrize("e", NO_PROBE)
def test_entry_builds_the_same_weights_and_inputs_every_time(e):
    a, b = e.build(), e.build()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    xa, xb = e.example(), e.example()
    pairs = zip(xa.values(), xb.values()) if isinstance(xa, dict) else [(xa, xb)]
    assert all(torch.equal(u, v) for u, v in pairs)


@pytest.mark.parametrize("e", NO_PROBE)
def test_entry_output_fits_its_task(e):
    model, x = e.build(), e.example()
    with torch.no_grad():
        out = first_output(model(**x) if isinstance(x, dict) else model(x))
    assert out.is_floating_point() and bool(torch.isfinite(out).all())
    assert out.shape[0] == e.batch_size
    if e.task == "lm":
        assert out.shape[-1] == e.vocab and out.dim() == 3
    elif e.task == "classify":
        assert out.dim() == 2 and out.shape[-1] >= 2
    else:
        assert e.task == "regress"


@pytest.mark.parametrize("e", ENTRIES)
def test_entry_probes_without_an_internal_error(e):
    report = varprobe.probe(e.build(), e.example(), batch_size=e.batch_size)
    assert report.weight_layers
    # a real network at its own init computes finite numbers everywhere
    for layer in report.layers:
        assert layer.forward is None or math.isfinite(layer.forward.var), layer.label
