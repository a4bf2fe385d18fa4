"""Where a number becomes a flag: the thresholds, their defaults and their checks.

Why each default is what it is: docs/flags.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from varprobe.errors import VarprobeError

SEVERITIES = ("error", "warning", "info")
FRACTIONS = ("dead_units", "underflow")  # thresholds that are fractions in (0, 1]
# A threshold a former version judged by; accepted in configuration and ignored.
RETIRED = {"grad_ratio": "‖∇W‖/‖W‖ against the median layer is no longer judged "
                         "(docs/flags.md: it differs by design between layers)"}


@dataclass(frozen=True)
class Thresholds:
    """Bands are [low, high].

    forward: a weight layer's input E[x^2] over its reference's (the tensor whose scale
    it inherits: the last normalization, embedding, pooling or attention before it, or
    the network input; varprobe.structure).
    output: the network output's E[y^2] over min(its reference's, 1), past which
    exploding_forward fires at the last weight layer (what the loss sees).
    backward: the product of measured backward multipliers along a chain of layers.
    multiplier: a layer's own n E[w^2] g (forward) and n^ E[w^2] g' (backward).
    stretch: how many weight layers in series after its reference a point needs before
    its scale is judged, and a stretch before a per-layer multiplier outside its band is
    worth a warning (a factor that does not repeat cannot compound).
    dead_units: the fraction of an activation's units that are zero for every sample.
    input: the network input's E[x^2].
    input_step: the network input's E[x^2] past which, in a network with no norm to
    reset it, the weight gradients and the loss's curvature carry it (an error).
    mismatch_sigmas: measured vs local prediction, in units of the width-aware
    noise sd of docs/theory-review.md §10 (sqrt(2/n) forward, sqrt(0.75/n) backward).
    underflow: the fraction of a tensor's elements that may flush to zero in the
    --precision format (docs/precision.md).
    attention_spread: the effective logit variance (1-r) s^2 past which attention's
    closed forms stop holding and the softmax heads towards one-hot (a warning).
    attention_participation: the mean sum_j p_ij^2, read over its floor at uniform weights
    ((Σp² - u) / (1 - u), u = 1/k over k keys), at or past which the average query puts
    most of its weight on one key (an error).
    """

    # Asymmetric, and both limits placed by training (bench/boundary.py, docs/flags.md):
    # a small signal is a scale the learning rate absorbs (He et al.'s 22-layer Xavier
    # net trained at 2^-21, their 30-layer one stalled at 2^-29; the corpus's VGG-16 at
    # kaiming init trains at 4e-3), and so is a large one inside a ReLU stack up to a
    # point: the rate SGD survives falls with the growth. Inside a stretch, SGD trained
    # every swept network up to 704 (a VGG's stem x70); where it failed, the output had
    # crossed its own limit below. 1e3 also catches growth a norm hides from the output.
    forward: tuple[float, float] = (1e-6, 1e3)
    # What the loss sees. Three sweeps put the edge at the same place: SGD trains the
    # tied LM head over 1000 tokens at E[y^2] = 1.3 and fails it at 12.0, trains the
    # one-conv VGG at 7.7 and fails it at 15.7, trains the every-conv VGG at 10.3 and
    # fails it at 103. 11 sits between 10.3 and 12.0. A 20-layer ReLU stack trains at
    # 247 (every layer shares the shrinking): the one swept point on the wrong side.
    output: float = 11.0
    # Low end: 1e-2 makes the bottom layers learn 10x slower than the top in norm. High
    # end: the chaotic-tanh sweep trains up to a product of 3e6 and fails from 7e7 (the
    # top layers fit an easy task while the bottom ones are noise); 1e7 sits between.
    # Exploding ReLU stacks cross the forward band first.
    backward: tuple[float, float] = (1e-2, 1e7)
    multiplier: tuple[float, float] = (0.6, 1 / 0.6)
    stretch: float = 3
    dead_units: float = 0.5
    input: tuple[float, float] = (0.1, 10.0)
    # A scale-keeping init carries the input's scale to the output: every weight
    # gradient grows with sqrt(E[x^2]) and the curvature with E[x^2], so the stable
    # learning rate shrinks 100x at 1e2 (an SGD grid is a few x wide). A norm makes the
    # layers before it scale-invariant (their gradients then do not grow) and resets
    # the scale for the layers after it.
    input_step: float = 1e2
    mismatch_sigmas: float = 4.0
    underflow: float = 0.01
    # attention.md §3.4-3.6: the lognormal forms are 20% off at (1-r)s^2 = 1.5. At sum p^2
    # = 1/2 the softmax Jacobian diag(p) - pp^T has lost most of its mass: the query and
    # key gradients vanish with it (entropy collapse, Zhai et al. 2023).
    attention_spread: float = 1.5
    attention_participation: float = 0.5

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def updated(self, values: Mapping[str, Any], where: str) -> Thresholds:
        """A copy with ``values`` applied; a VarprobeError naming the key when one is bad."""
        changes = {}
        for key, value in values.items():
            if key in RETIRED:
                continue
            if key not in self.names():
                raise VarprobeError(f"{where}: unknown threshold {key!r} "
                                    f"(valid: {', '.join(self.names())})")
            changes[key] = _checked(key, value, isinstance(getattr(self, key), tuple), where)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def _checked(key: str, value: Any, band: bool, where: str) -> Any:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if band:
        if (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(number, value))
                and 0 < value[0] < value[1]):
            return (float(value[0]), float(value[1]))
        raise VarprobeError(f"{where}: threshold {key!r} must be [low, high] with "
                            f"0 < low < high, not {value!r}")
    limit = 1.0 if key in FRACTIONS else math.inf
    if number(value) and 0 < value <= limit:
        return float(value)
    raise VarprobeError(f"{where}: threshold {key!r} must be a number in "
                        f"{'(0, 1]' if key in FRACTIONS else '(0, inf)'}, not {value!r}")
