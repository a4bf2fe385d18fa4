"""The token correlation an embedding lookup gives: how often two positions share an id.

Two positions of one sequence get the same row of an embedding table exactly when their
ids agree, and rows drawn alike and independently are otherwise uncorrelated, so the
lookup's uncentered token correlation (attention.md §3.7) is

    r = P(id_i = id_j), i != j in one sequence
      = mean over sequences of sum_v c_v (c_v - 1) / (T (T - 1))   (c_v: id v's count)

(theory.correlation.embedding). Random ids over a vocabulary of V give about 1/V;
BERT's token types, all 0 when none are given, give 1: the same vector added to every
token, which then makes up a third of the embeddings' sum (word + position + type) and
keeps a third of each attention output's values alike. Taking every lookup as r = 0
put BERT's first attention outputs ~18x low on the meta device, where nothing is
measured. The ids are read where they have values: a probe's own tensors (reduced on
the device, fetched with the pass's other constants), the index tensors varprobe
predict gives values on meta (varprobe.metavalues); elsewhere r stays 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from varprobe.theory.signal import Signal


def enter(rec: Any, index: int, module: nn.Module, tensors: list[torch.Tensor],
          value_of: Callable[[torch.Tensor], torch.Tensor | None] | None) -> None:
    """At an embedding call's entry: a slot among the recording's constants holding
    (P(two positions share an id), 0)."""
    if not isinstance(module, nn.Embedding):
        return
    ids = next((t for t in tensors if not t.is_floating_point()), None)
    if ids is not None and ids.is_meta:
        ids = value_of(ids) if value_of is not None else None
    if ids is None or ids.dim() == 0 or ids.shape[-1] < 2:
        return
    rec.same_ids[index] = len(rec._constants)
    rec._constants.append(torch.stack([same_id(ids),
                                       torch.zeros((), dtype=torch.float64, device=ids.device)]))


def same_id(ids: torch.Tensor) -> torch.Tensor:
    """P(id_i = id_j) over pairs of distinct positions (the last axis) of one sequence,
    averaged over the sequences; on the ids' device, without a transfer, in memory of
    the ids' size. In each sorted row, an id's run of c equal entries holds
    c (c - 1) / 2 pairs: position i of the run has i - (the run's start) before it."""
    rows = torch.sort(ids.reshape(-1, ids.shape[-1]), dim=-1).values
    t = rows.shape[-1]
    at = torch.arange(t, device=ids.device).expand_as(rows)
    new_run = torch.ones_like(rows, dtype=torch.bool)
    new_run[:, 1:] = rows[:, 1:] != rows[:, :-1]
    start = torch.cummax(torch.where(new_run, at, torch.zeros_like(at)), dim=-1).values
    pairs = 2 * (at - start).sum(-1, dtype=torch.float64) / (t * (t - 1))
    return pairs.mean()


def correlate(out: Signal | None, module: nn.Module, constants: list, graph: Any,
              index: int) -> Signal | None:
    """An embedding's output with the token correlation its ids give."""
    slot = getattr(graph, "same_ids", {}).get(index)
    if out is None or slot is None or constants[slot] is None \
            or not isinstance(module, nn.Embedding):
        return out
    r = min(1.0, max(0.0, float(constants[slot][0])))
    return replace(out, r=max(r, out.mean_share))
