"""Embeddings: Embedding -> op -> Linear, token ids uniform over the vocabulary.

Rule: the output's second moment is that of the rows looked up (E[w^2] for a table drawn
i.i.d.), plus, for a sum of token and position embeddings, the sum of both (independent
tables); the gradient of the embedding's output is the next layer's n^ E[w^2] Var[dy].
Forward is measured at the embedding itself and at the Linear after it; backward at the
embedding's output gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.accuracy._harness import POST_OUT, Spec, init_, run

VOCAB, BATCH, TOKENS = 1000, 32, 64
INITS = {"N(0,1) (torch default)": None, "std 0.02": 0.02, "std 1/sqrt(n)": "lecun"}


class Embedder(nn.Module):
    def __init__(self, n: int, kind: str):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(VOCAB, n, padding_idx=0 if kind == "padding_idx 0" else None)
        if kind == "token + position":
            self.pos = nn.Embedding(TOKENS, n)
        if kind == "F.embedding with a parameter":
            self.table = nn.Parameter(torch.randn(VOCAB, n))
        self.post = nn.Linear(n, POST_OUT)

    def forward(self, ids):
        if self.kind == "F.embedding with a parameter":
            h = F.embedding(ids, self.table)
        else:
            h = self.emb(ids)
        if self.kind == "token + position":
            h = h + self.pos(torch.arange(ids.shape[1]))
        if self.kind == "scaled by sqrt(n)":
            h = h * math.sqrt(h.shape[-1])
        return self.post(h)


KINDS = ("nn.Embedding", "padding_idx 0", "token + position", "scaled by sqrt(n)",
         "F.embedding with a parameter")


def spec(kind: str, width: int, init: str) -> Spec:
    std = INITS[init]

    def build() -> nn.Module:
        model = init_(Embedder(width, kind), "he")
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Embedding) and std is not None:
                    m.weight.normal_(0, 1 / math.sqrt(width) if std == "lecun" else std)
                    if m.padding_idx is not None:
                        m.weight[m.padding_idx].zero_()
        return model

    def ids(gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen)
    first = "emb" if kind != "F.embedding with a parameter" else "post"
    return Spec(rule=kind, case=f"width {width}, {init}", build=build, inputs=ids, width=width,
                forward=("post", "forward"), backward=(first, "backward") if first != "post"
                else None, tags={"width": width, "init": init, "first": first})


def specs() -> list[Spec]:
    return [spec(kind, w, init) for kind in KINDS for w in (64, 256, 1024) for init in INITS]


def cases(seeds: int = 8) -> list[dict]:
    return run(specs(), seeds)
