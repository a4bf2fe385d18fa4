"""The backward pass starts from ``cotangent.paired``: the gradients are torch's own
``autograd.grad(outs, wrt, cotangents)`` bit for bit, each output's gradient is its
cotangent's memory (no copy), a cotangent of the wrong shape is a usage error, and a
probe leaves sympy unimported (autograd's ``grad_outputs`` check would import it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import varprobe
from varprobe.cotangent import paired
from varprobe.errors import VarprobeError


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 7)
        self.a, self.b = nn.Linear(7, 3), nn.Linear(7, 4)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.a(h), self.b(h).t()  # the second one not contiguous


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_autograds_own(dtype):
    torch.manual_seed(0)
    model = TwoHeads().to(dtype)
    x = torch.randn(6, 5, dtype=dtype)
    wrt = list(model.parameters())
    outs = list(model(x))
    cots = [torch.randn(o.shape, dtype=dtype) for o in outs]
    want = torch.autograd.grad(outs, wrt, cots)
    got = torch.autograd.grad(paired(list(model(x)), cots), wrt)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_each_output_gets_its_cotangents_memory():
    model = TwoHeads()
    outs = list(model(torch.randn(6, 5)))
    cots = [torch.randn(o.shape) for o in outs]
    seen = {}
    for i, o in enumerate(outs):
        o.register_hook(lambda g, i=i: seen.__setitem__(i, g.data_ptr()))
    torch.autograd.grad(paired(outs, cots), list(model.parameters()))
    assert seen == {i: c.data_ptr() for i, c in enumerate(cots)}


def test_the_default_cotangent_drives_the_first_output_and_says_so():
    """He's N(0, 1) goes to the first float output; the second head gets no gradient, and
    the report says how to drive it. A given cotangent or a loss drives both, silently."""
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    report = varprobe.probe(TwoHeads(), x)
    heads = {layer.name: layer for layer in report.layers}
    assert heads["a"].backward is not None and heads["b"].backward is None
    assert any("first of the output's 2 float tensors" in n for n in report.notes)
    driven = varprobe.probe(TwoHeads(), x, loss=lambda out: out[0].sum() + out[1].sum())
    assert {layer.name: layer for layer in driven.layers}["b"].backward is not None
    assert not any("first of the output" in n for n in driven.notes)


class Skipping(nn.Module):
    """Three blocks, the middle one skipped (as LayerDrop skips a layer at random in
    train mode), an unused head, and a frozen layer that runs."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(5, 5) for _ in range(3))
        self.frozen = nn.Linear(5, 5).requires_grad_(False)
        self.unused_head = nn.Linear(5, 2)

    def forward(self, x):
        for k in (0, 2):
            x = torch.relu(self.blocks[k](x))
        return self.frozen(x)


def test_modules_whose_parameters_get_no_gradient_are_named():
    """autograd.grad's own None for a parameter the pass did not reach: the skipped
    block and the unused head are named (their layers are not in the report), the
    frozen layer is not (it asks for no gradient); the two heads above get the second
    one named, as it feeds only the output the cotangent does not drive."""
    report = varprobe.probe(Skipping(), torch.randn(6, 5))
    note = next(n for n in report.notes if "got no gradient" in n)
    assert "2 module(s)" in note and "blocks.1, unused_head" in note
    assert "blocks.1" not in {layer.name for layer in report.layers}
    report = varprobe.probe(TwoHeads(), torch.randn(6, 5))
    assert any("got no gradient for their parameters (b)" in n for n in report.notes)
    driven = varprobe.probe(TwoHeads(), torch.randn(6, 5),
                            loss=lambda out: out[0].sum() + out[1].sum())
    assert not any("got no gradient" in n for n in driven.notes)


def test_a_cotangent_of_another_shape_is_refused():
    out = nn.Linear(3, 4)(torch.randn(2, 3))
    with pytest.raises(VarprobeError, match=r"grad_output has shape \(1, 4\), the output "
                                            r"has \(2, 4\)"):
        paired([out], [torch.ones(1, 4)])  # broadcastable: autograd would sum it


def test_a_probe_with_a_wrong_grad_output_says_so():
    with pytest.raises(VarprobeError, match="grad_output has shape"):
        varprobe.probe(nn.Linear(3, 4), torch.randn(2, 3), grad_output=torch.ones(4))


def imports_sympy(script: str) -> bool:
    """Whether a fresh interpreter running ``script`` ends with sympy imported."""
    done = subprocess.run([sys.executable, "-c", script + "\nprint('sympy' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1] == "True"


def test_a_probe_does_not_import_sympy():
    assert not imports_sympy("import sys, torch, varprobe\n"
                             "varprobe.probe(torch.nn.Linear(3, 4), torch.randn(2, 3),"
                             " grad_output=torch.randn(2, 4))")
    # not blind: autograd's own start with grad_outputs does import it
    assert imports_sympy("import sys, torch\n"
                         "y = torch.nn.Linear(3, 4)(torch.randn(2, 3))\n"
                         "torch.autograd.grad(y, [y], torch.randn(2, 4))")


def test_a_grad_output_dict_is_matched_by_key():
    """A dict output's cotangent given in another key order goes to the same keys (each
    layer's backward variance equals the matched order's), and other keys are refused."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    torch.manual_seed(0)
    model, x = Two(), torch.randn(64, 8)
    ga, gb = torch.randn(64, 8), 10 * torch.randn(64, 8)
    same = varprobe.probe(model, x, grad_output={"a": ga, "b": gb})
    swapped = varprobe.probe(model, x, grad_output={"b": gb, "a": ga})
    assert [layer.backward.var for layer in swapped.layers] == \
        [layer.backward.var for layer in same.layers]
    assert same.layers[1].backward.var > 50 * same.layers[0].backward.var
    with pytest.raises(VarprobeError, match="keys"):
        varprobe.probe(model, x, grad_output={"a": ga, "c": gb})
