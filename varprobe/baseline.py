"""Compare two reports: which layers' forward or backward variance moved, which came
and went. Layers are matched by (name, call)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from varprobe.report import Layer, Report

DEFAULT_FACTOR = 2.0
QUANTITIES = (("forward E[y²]", lambda layer: layer.forward.second_moment
               if layer.forward else None),
              ("backward Var", lambda layer: layer.backward.var if layer.backward else None))


@dataclass
class Change:
    layer: str
    quantity: str
    before: float | None
    after: float | None

    @property
    def factor(self) -> float | None:
        if self.before and self.after and self.before > 0 and self.after > 0:
            return self.after / self.before
        return None

    def describe(self) -> str:
        factor = self.factor
        moved = (f"×{factor:.3g}" if factor is not None else
                 "became unmeasurable" if self.after is None else "was unmeasurable"
                 if self.before is None else "through zero")
        return f"{self.layer}: {self.quantity} {_num(self.before)} → {_num(self.after)} ({moved})"


@dataclass
class Diff:
    factor: float
    moved: list[Change] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regression(self) -> bool:
        """A matched layer's variance moved beyond the factor (added or removed layers
        are an architecture change: listed, not failed)."""
        return bool(self.moved)

    def lines(self) -> list[str]:
        out = [f"moved  {c.describe()}" for c in self.moved]
        out += [f"added  {name}" for name in self.added]
        out += [f"removed {name}" for name in self.removed]
        out += [f"note   {note}" for note in self.notes]
        return out


def _num(value: float | None) -> str:
    if value is None:
        return "null"
    return f"{value:.3g}" if value == 0 or 1e-2 <= abs(value) < 1e3 else f"{value:.2e}"


def _key(layer: Layer) -> tuple[str, int]:
    return layer.name, layer.call


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def diff(base: Report, new: Report, factor: float = DEFAULT_FACTOR) -> Diff:
    """Layers whose forward E[y^2] or backward Var[dL/dy] changed by more than
    ``factor`` either way (or became, or stopped being, measurable)."""
    if not factor > 1:
        raise ValueError(f"factor must be > 1, not {factor}")
    before = {_key(layer): layer for layer in base.layers}
    after = {_key(layer): layer for layer in new.layers}
    result = Diff(factor=factor,
                  added=[layer.label for k, layer in after.items() if k not in before],
                  removed=[layer.label for k, layer in before.items() if k not in after])
    for key, old in before.items():
        if key not in after:
            continue
        for quantity, get in QUANTITIES:
            a, b = _finite(get(old)), _finite(get(after[key]))
            if _moved(a, b, factor):
                result.moved.append(Change(old.label, quantity, a, b))
    for setting in ("seed", "batch_size", "mode", "device", "init", "grad"):
        old_value, new_value = base.settings.get(setting), new.settings.get(setting)
        if old_value != new_value:
            result.notes.append(f"settings differ: {setting} {old_value} → {new_value}")
    return result


def _moved(a: float | None, b: float | None, factor: float) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    if a == b:
        return False
    if a <= 0 or b <= 0:
        return True
    return abs(math.log(b / a)) > math.log(factor)
