"""bench/labels.py: the synthetic tasks and the "trains" criterion, on tiny networks.

Expected values come from the task definitions (chance = ln(classes); the Markov chain
puts 0.45 + 0.1/vocab on each of two successors; the class offsets are the input's std),
never from the code under test.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench import labels
from corpus import Entry


def _entry(make, task="classify", vocab=None, width=64) -> Entry:
    inputs = (
        (lambda b: torch.randint(vocab, (b, 12)))
        if task == "lm"
        else (lambda b: torch.randn(b, width))
    )
    return Entry("tiny", "test", make, inputs, batch_size=8, task=task, vocab=vocab)


def test_labels_markov_chain_has_two_likely_successors():
    vocab, gen = 8, torch.Generator().manual_seed(0)
    seq = labels._markov(vocab, torch.Size((400, 50)), gen)
    counts = torch.zeros(vocab, vocab)
    counts.index_put_(
        (seq[:, :-1].reshape(-1), seq[:, 1:].reshape(-1)), torch.ones(400 * 49), accumulate=True
    )
    top2 = counts.topk(2, dim=1).values.sum(1) / counts.sum(1)
    # two distinct successors carry 0.9 + 2 * 0.1/8 = 0.925 (a repeated draw: 0.9125);
    # ~2450 transitions per token, so the binomial s.e. is ~0.005: 0.88 is > 6 s.e. below
    assert (top2 > 0.88).all(), top2


def test_labels_chance_and_shapes():
    task = labels.make_task(_entry(lambda: nn.Linear(64, 5)))
    assert math.isclose(task.chance, math.log(4))  # 4 classes of the 5 logits
    assert math.isclose(labels.make_task(_entry(lambda: nn.Linear(64, 3))).chance,
                        math.log(3))
    assert task.resolution == "native"
    lm = labels.make_task(
        _entry(lambda: nn.Sequential(nn.Embedding(7, 8), nn.Linear(8, 7)), "lm", 7)
    )
    assert math.isclose(lm.chance, math.log(7))
    idx = torch.arange(4)
    out = torch.zeros(4, 12, 7)  # uniform logits: exactly the chance loss
    assert math.isclose(lm.loss(out, idx).item(), math.log(7), rel_tol=1e-6)


def test_labels_large_images_train_small():
    e = Entry(
        "img",
        "test",
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        lambda b: torch.randn(b, 3, 224, 224),
        batch_size=2,
    )
    task = labels.make_task(e, size=32)
    assert task.resolution == "32x32" and task.inputs.shape == (64, 3, 32, 32)


def test_labels_criterion_separates_a_trainable_and_a_dead_net():
    def mlp():
        return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 4))

    def dead():
        model = mlp()
        nn.init.constant_(model[0].bias, -100.0)  # every ReLU off: no gradient reaches layer 0
        return model

    ok, bad = labels.label(_entry(mlp), 40, 8), labels.label(_entry(dead), 40, 8)
    assert ok["adamw"]["trains"] and ok["adamw"]["final"] <= 0.5 * math.log(4)
    assert ok["sgd"]["trains"] and ok["sgd"]["runs"]["0.1"]["steps"] < 40  # stopped early
    assert not bad["adamw"]["trains"] and not bad["sgd"]["trains"]
    assert set(bad["sgd"]["runs"]) == {str(lr) for lr in labels.GRIDS["sgd"]}  # full grid tried


def test_labels_show_the_class_at_the_inputs_own_scale():
    """Raw pixels stay raw: each class shifts every channel by a fixed offset of the
    input's std, the same at every position; integer inputs keep to a class's quarter
    of the vocabulary."""
    x = 100 + 50 * torch.rand(64, 3, 8, 8)
    y = torch.arange(64) % 4
    shown = labels._show_classes(x, y, None, torch.Generator().manual_seed(0))
    shift = shown - x
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))  # constant per map
    for c in range(4):
        rows = shift[y == c, :, 0, 0]
        assert torch.allclose(rows, rows[:1].expand_as(rows))  # one offset per class
    assert shift.abs().max() < 5 * x.std()
    tokens = labels._show_classes(torch.zeros(64, 10, dtype=torch.long), y, 100,
                                  torch.Generator().manual_seed(0))
    assert ((tokens // 25) == y[:, None]).all()


def test_labels_regression_targets_vary_along_the_channels_of_an_image_or_video_map():
    """One class: its target is one vector, constant over every position of the map."""
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(2, dtype=torch.long)
    for shape in (torch.Size((3, 4, 5)), torch.Size((3, 2, 4, 5))):  # (C, H, W), (C, F, H, W)
        t = labels._class_targets(y, shape, gen)
        flat = t.flatten(2)  # (B, C, positions)
        assert torch.equal(flat, flat[..., :1].expand_as(flat))
        assert flat[0, :, 0].unique().numel() == 3  # three channels, three values
