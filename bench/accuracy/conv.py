"""Convolutions: Conv -> op -> Conv with the op a convolution, measured at the op itself
(``forward`` and ``backward_input``).

Rule (He et al. 2015; docs/theory.md "Borders and stride"): E[y^2] = n_eff E[w^2] E[x^2]
+ mean(b^2) with n_eff the taps that land on real input (zero padding), per group;
Var[dx] = n^_eff E[w^2] Var[dy] with n^_eff the outputs an input feeds (stride,
padding, transposed convs: about k/s^d taps per output).
"""

from __future__ import annotations

from torch import nn

from bench.accuracy._harness import Knobs, Spec, conv_sandwich, gaussian, grid, run

POSITIONS = 1024  # batch x map positions of the op's input, for every map size

# name: (factory(c) -> op, map side, dims)
CONVS = {
    "Conv2d 3x3 pad 1 (8x8)": (lambda c: nn.Conv2d(c, c, 3, padding=1), 8, 2),
    "Conv2d 3x3 pad 1 (16x16)": (lambda c: nn.Conv2d(c, c, 3, padding=1), 16, 2),
    "Conv2d 3x3 pad 1 (4x4)": (lambda c: nn.Conv2d(c, c, 3, padding=1), 4, 2),
    "Conv2d 3x3 no pad": (lambda c: nn.Conv2d(c, c, 3), 8, 2),
    "Conv2d 7x7 pad 3 (8x8)": (lambda c: nn.Conv2d(c, c, 7, padding=3), 8, 2),
    "Conv2d 3x3 stride 2": (lambda c: nn.Conv2d(c, c, 3, stride=2, padding=1), 8, 2),
    "Conv2d 3x3 dilation 2": (lambda c: nn.Conv2d(c, c, 3, padding=2, dilation=2), 8, 2),
    "Conv2d 3x3 groups 4": (lambda c: nn.Conv2d(c, c, 3, padding=1, groups=4), 8, 2),
    "Conv2d 3x3 depthwise": (lambda c: nn.Conv2d(c, c, 3, padding=1, groups=c), 8, 2),
    "Conv2d 1x1": (lambda c: nn.Conv2d(c, c, 1), 8, 2),
    "ConvTranspose2d 4x4 stride 2": (lambda c: nn.ConvTranspose2d(c, c, 4, 2, 1), 8, 2),
    "ConvTranspose2d 2x2 stride 2": (lambda c: nn.ConvTranspose2d(c, c, 2, 2), 8, 2),
    "ConvTranspose2d 3x3 pad 1": (lambda c: nn.ConvTranspose2d(c, c, 3, 1, 1), 8, 2),
    "Conv1d 5 pad 2 (length 32)": (lambda c: nn.Conv1d(c, c, 5, padding=2), 32, 1),
}


def spec(name: str, knobs: Knobs) -> Spec:
    make, side, dims = CONVS[name]
    c = knobs.width
    build = conv_sandwich(knobs, lambda self, h: self.op(h), dims=dims, op=lambda: make(c))
    shape = (POSITIONS // side ** dims, c) + (side,) * dims
    return Spec(rule=name, case=knobs.label(), build=build, inputs=gaussian(shape, knobs.scale),
                width=c, forward=("op", "forward"), backward=("op", "backward_input"),
                fwd_out=c, tags=dict(knobs.__dict__))


def specs() -> list[Spec]:
    out = []
    for name in CONVS:
        out += [spec(name, k) for k in grid(widths=(64, 256))]
    return out


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
