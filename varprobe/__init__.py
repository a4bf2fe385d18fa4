"""varprobe: does the signal survive the trip through your network?

The public API is imported lazily so that ``varprobe --help`` never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["probe", "assert_healthy", "Report", "VarprobeError", "__version__"]

if TYPE_CHECKING:
    from varprobe.errors import VarprobeError
    from varprobe.health import assert_healthy
    from varprobe.pipeline import probe
    from varprobe.report import Report

_LAZY = {"probe": "varprobe.pipeline", "Report": "varprobe.report",
         "VarprobeError": "varprobe.errors", "assert_healthy": "varprobe.health"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'varprobe' has no attribute {name!r}")
