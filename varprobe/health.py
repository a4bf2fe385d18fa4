"""``assert_healthy``: probe a model in a test suite and fail with its flags."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from varprobe.diagnose import SEVERITIES, Thresholds, flags
from varprobe.errors import VarprobeError
from varprobe.pipeline import probe


def assert_healthy(model: Any, inputs: Any = None, *, fail_on: str = "error",
                   ignore: Iterable[str] = (), batch_size: int = 256, seed: int = 0,
                   **thresholds: Any) -> Any:
    """Probe ``model`` and raise AssertionError listing every flag at or above ``fail_on``.

    Keyword thresholds override the defaults, e.g. ``forward=(1e-3, 1e3)``. Returns the
    Report when the model passes.
    """
    if fail_on not in SEVERITIES:
        raise ValueError(f"fail_on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}")
    try:
        t = Thresholds().updated(thresholds, "assert_healthy")
    except VarprobeError as exc:
        raise TypeError(str(exc)) from None
    report = probe(model, inputs, batch_size=batch_size, seed=seed, thresholds=t,
                   ignore=ignore)
    found = flags(report, fail_on)
    if found:
        lines = [f"  {f.severity} {f.code} at {layer.label}: {f.message}" for layer, f in found]
        fix = report.summary.fix
        if fix is not None:
            lines.append(f"  fix: {fix.short}")
        raise AssertionError(f"varprobe: {type(model).__name__} has {len(found)} flag(s) at "
                             f"or above {fail_on}:\n" + "\n".join(lines))
    return report
