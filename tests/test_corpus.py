"""The calibration corpus: every entry builds, probes cleanly, and pairs are consistent.

No verdicts are asserted here: the corpus is what verdict rules are judged on, and
whether an entry trains comes from bench/labels.py, not from varprobe. Select with
``-k corpus``.
"""

from __future__ import annotations

import pytest
import torch

import corpus
import varprobe
from tests.pristine import assert_untouched, snapshot

ENTRIES = corpus.entries()
BROKEN = [e for e in ENTRIES if e.broken is not None]

# Entries on which varprobe itself raises; strict, so a fix turns the test red and the
# entry is taken off this list.
KNOWN_CRASHES = {
    "densenet_cifar": "graph._pieces_normalized: AttributeError, 'NoneType' object has no "
                      "attribute 'm2' (propagating back through a concatenation fed by BatchNorm)",
}


def _params(entry: corpus.Entry) -> list:
    marks = []
    if entry.name in KNOWN_CRASHES:
        marks.append(pytest.mark.xfail(raises=AttributeError, strict=True,
                                       reason=KNOWN_CRASHES[entry.name]))
    return pytest.param(entry, id=entry.name, marks=marks)


def _tensors(inputs) -> list[torch.Tensor]:
    if isinstance(inputs, dict):
        return list(inputs.values())
    return list(inputs) if isinstance(inputs, tuple) else [inputs]


def _same(a, b) -> bool:
    x, y = _tensors(a), _tensors(b)
    return len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))


@pytest.mark.parametrize("entry", [_params(e) for e in ENTRIES])
def test_corpus_entry_probes(entry: corpus.Entry):
    """Seeded (two builds and two examples are bitwise equal: the labels and every probe
    see the same network), and one probe returns a report and leaves the model as found."""
    model, again = entry.build(), entry.build().state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    inputs = entry.example()
    assert _same(inputs, entry.example())
    before = snapshot(model)
    report = varprobe.probe(model, inputs)
    assert isinstance(report, varprobe.Report)
    assert report.layers, f"{entry.name}: no layer recorded"
    assert_untouched(model, before)


def test_corpus_names_fields():
    assert len(ENTRIES) >= 16 + 2 * 20
    for e in ENTRIES:
        assert e.task in ("classify", "lm", "regress"), e.name
        assert e.task != "lm" or (e.vocab and e.vocab > 1), e.name
        assert e.batch_size >= 1, e.name


@pytest.mark.parametrize("entry", BROKEN, ids=lambda e: e.name)
def test_corpus_broken_has_twin(entry: corpus.Entry):
    """A broken entry names a healthy twin that names it back, on the same task, whose
    network has the same modules and parameter shapes; its culprits exist."""
    twin = corpus.entry(entry.twin)
    assert twin.broken is None and twin.twin == entry.name
    assert (twin.task, twin.vocab) == (entry.task, entry.vocab)
    broken, healthy = entry.build(), twin.build()
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(broken) == shapes(healthy)
    names = dict(broken.named_modules())
    assert all(c in names for c in entry.culprits), entry.culprits
    assert bool(entry.culprits) != ("global" in entry.tags)


@pytest.mark.parametrize("entry", [e for e in BROKEN if e.culprits], ids=lambda e: e.name)
def test_corpus_culprits_differ_from_twin(entry: corpus.Entry):
    """A named culprit is a place where the pair differs: its own parameters, or, for a
    mistake in the data, the input it is the first to read."""
    twin = corpus.entry(entry.twin)
    if not _same(entry.example(), twin.example()):
        return
    broken, healthy = entry.build().state_dict(), twin.build().state_dict()
    differ = {k.rsplit(".", 1)[0] for k in broken if not torch.equal(broken[k], healthy[k])}
    assert set(entry.culprits) <= differ, differ
