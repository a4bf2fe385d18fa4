"""The printed fix: code that re-draws the weight layers as ``--init SCHEME`` does.

The scheme columns and ``--init`` (reinit) draw N(0, Var[w]) with Var[w] =
theory.scheme_variance(scheme, fan_in, fan_out, a) on varprobe's fans (theory.fans)
and zero the bias. torch's kaiming_*/xavier_* compute fans of their own, which differ
for transposed convs (torch's fan_in is (out/g)·k there) and grouped or depthwise
convs (its fan_out is g times too large), so pasting them would give another init than
the one scored. The printed code writes the fans and the variance out instead, the
very formulas the scheme was scored with. ``torch-default`` is each layer's own
``reset_parameters()``: PyTorch's default, bias included, on torch's fans, as scored
(written out for transformers' ``Conv1D``, which has none).
"""

from __future__ import annotations

from varprobe.report import Layer

# Var[w] of each scheme in the printed code's terms (theory.scheme_variance's formulas).
VARIANCE = {"he": "2 / fan_in", "he-fan-out": "2 / fan_out",
            "he-prelu": "2 / ((1 + a**2) * fan_in)", "xavier": "2 / (fan_in + fan_out)",
            "lecun": "1 / fan_in"}

FANS = '''import math


def fans(m):
    """varprobe's (fan_in, fan_out): the terms of one output's sum, of one input's
    gradient sum. Conv and ConvTranspose alike: (in/groups)*k, (out/groups)*k;
    transformers' Conv1D keeps its weight as (in, out)."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if type(m).__name__ == "Conv1D":
        return tuple(m.weight.shape)
    k = math.prod(m.kernel_size)
    return m.in_channels // m.groups * k, m.out_channels // m.groups * k


'''

DRAW = '''    fan_in, fan_out = {fans}
    nn.init.normal_(m.weight, std=math.sqrt({variance}))
    if m.bias is not None:
        nn.init.zeros_(m.bias)'''


def code(scheme: str, weights: list[Layer], slopes: list[float]) -> tuple[str, str]:
    """Runnable code for ``model`` (with ``nn`` being torch.nn) that re-draws every
    layer in ``weights`` (Linear/Conv/ConvTranspose), and the init alone in one line.
    ``slopes``: he-prelu's PReLU slope for each of ``weights``."""
    kinds = _kinds(weights)
    if scheme == "torch-default":
        return _torch_default(weights), "torch-default init: each layer's reset_parameters()"
    variance = VARIANCE[scheme]
    # Linear layers alone need no helper: their fans are their features.
    linear = all(layer.type == "Linear" for layer in weights)
    helper, fans = ("import math\n\n", "m.in_features, m.out_features") if linear \
        else (FANS, "fans(m)")
    draw = DRAW.format(fans=fans, variance=variance)
    short = f"{scheme} init: normal_(std=sqrt({variance})) on varprobe's fans, zero bias"
    distinct = {round(a, 4) for a in slopes}
    if scheme == "he-prelu" and len(distinct) > 1:
        table = ", ".join(f"{layer.name!r}: {a:.6g}" for layer, a in zip(weights, slopes))
        return (helper + f"for name, a in {{{table}}}.items():\n"
                "    m = model.get_submodule(name)\n" + draw), short
    head = f"a = {next(iter(distinct)):.6g}\n" if scheme == "he-prelu" else ""
    body = "\n".join("    " + line for line in draw.splitlines())
    return (helper + head + f"for m in model.modules():\n    if {kinds}:\n"
            + body), short


def redraw(scheme: str, layer: Layer) -> tuple[str, str]:
    """Runnable code that re-draws the one layer ``layer.name`` (its module path) with
    ``scheme`` (one of VARIANCE's), and the init alone in one line."""
    linear = layer.type == "Linear"
    helper, fans = ("import math\n\n", "m.in_features, m.out_features") if linear \
        else (FANS, "fans(m)")
    draw = DRAW.format(fans=fans, variance=VARIANCE[scheme])
    body = "\n".join(line.removeprefix("    ") for line in draw.splitlines())
    short = (f"{scheme} init on {layer.name} alone: normal_(std=sqrt({VARIANCE[scheme]})) "
             "on varprobe's fans, zero bias")
    return helper + f"m = model.get_submodule({layer.name!r})\n" + body, short


# transformers' Conv1D has no reset_parameters: what nn.Linear's does, on torch's fan-in
# of Conv1D's (in, out) weight, which is its out (the fans the scheme was scored on)
CONV1D_DEFAULT = """import math

for m in model.modules():
{first}type(m).__name__ == "Conv1D":
        nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
        if m.bias is not None:
            bound = 1 / math.sqrt(m.weight.shape[1])
            nn.init.uniform_(m.bias, -bound, bound)"""


def _torch_default(weights: list[Layer]) -> str:
    torch_nn = [layer for layer in weights if layer.type != "Conv1D"]
    reset = (f"    if {_kinds(torch_nn)}:\n        m.reset_parameters()\n") if torch_nn else ""
    if len(torch_nn) == len(weights):
        return "for m in model.modules():\n" + reset.rstrip("\n")
    return CONV1D_DEFAULT.format(first=reset + ("    elif " if reset else "    if "))


def _kinds(weights: list[Layer]) -> str:
    """The test that picks the scored layers: by class, transformers' Conv1D by name
    (it is not in torch.nn)."""
    types = sorted({layer.type for layer in weights} - {"Conv1D"})
    names = [f"nn.{t}" for t in types]
    joined = names[0] if len(names) == 1 else "(" + ", ".join(names) + ")"
    tests = [f"isinstance(m, {joined})"] if names else []
    if len(types) < len({layer.type for layer in weights}):
        tests.append('type(m).__name__ == "Conv1D"')
    return " or ".join(tests)
