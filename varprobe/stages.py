"""The pipeline's stages, and what happens when varprobe itself fails in one of them.

A VarprobeError is the user's to fix (exit code 2) and passes through untouched.
Anything else raised inside a stage is a bug in varprobe: an InternalError that names
the stage (exit code 3, never 1, which CI reads as "flagged"). A report is still a
report without its predictions, plots or renderings, so a failure in one of those
stages is written into ``report.stages`` (and a note) and the rest goes on.

Imports nothing heavy: the command line uses it before torch is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from varprobe.errors import VarprobeError

STAGES = ("load", "input", "record", "predict", "diagnose", "render", "plot", "write")
ISOLATED = frozenset({"predict", "render", "plot"})

# What the predict stage fills in: a failed one leaves them null, with the reason,
# instead of whatever half of them it had written.
LAYER_PREDICTIONS = ("effective_fan_in", "effective_fan_out", "activation", "gain",
                     "backward_gain", "input_activation", "input_gain",
                     "forward_multiplier", "backward_multiplier", "predicted", "local")


class InternalError(Exception):
    """A bug in varprobe, raised in ``stage``; ``__cause__`` is the original error."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        super().__init__(f"internal error in the {stage} stage: {describe(cause)}")


def describe(exc: BaseException) -> str:
    """``KeyError: 'x'``: the exception's type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def bug_report_hint() -> str:
    """Where to report a bug: the tracker the installed package names, if any."""
    from importlib import metadata

    with contextlib.suppress(Exception):
        for entry in metadata.metadata("varprobe").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("issues", "bug tracker", "tracker"):
                return f"please report it at {url.strip()}"
    return "please report it on varprobe's issue tracker"


def internal_line(exc: BaseException, name: str | None = None) -> str:
    """The one stderr line for a bug in varprobe (the traceback only on --debug).
    ``name``: the stage, where ``exc`` is not an InternalError that names it."""
    cause = exc
    if isinstance(exc, InternalError):
        name, cause = exc.stage, exc.__cause__ or exc
    return _line(name, describe(cause))


def failed_stage_line(entry: dict[str, str]) -> str:
    """The stderr line for an isolated stage that failed (an entry of report.stages)."""
    error = f"{entry['error']}: {entry['message']}" if entry["message"] else entry["error"]
    return _line(entry["stage"], error) + "; the rest of the report is complete"


def _line(name: str | None, error: str) -> str:
    where = f"internal error in the {name} stage" if name else "internal error"
    return (f"varprobe: {where}: {error}: this is a bug in varprobe, not in your model; "
            f"{bug_report_hint()}, with the output of --debug")


_HANDLER = logging.StreamHandler()


def show_tracebacks(debug: bool) -> None:
    """Whether the traceback of an isolated stage that fails goes to stderr (--debug);
    set by each command, to the stderr of the moment."""
    log = logging.getLogger("varprobe")
    _HANDLER.stream = sys.stderr  # not setStream: it flushes the old one, maybe closed
    if _HANDLER not in log.handlers:
        log.addHandler(_HANDLER)
    log.setLevel(logging.DEBUG if debug else logging.WARNING)


def cli_stage(name: str, report: Any = None, expected: tuple[type[BaseException], ...] = ()):
    """``stage`` for the command line: an isolated failure is told on stderr at once."""
    return stage(name, report, lambda entry: print(failed_stage_line(entry), file=sys.stderr),
                 expected)


def tell_failed(report: Any) -> None:
    """Tell on stderr of the isolated stages that failed inside the library (predict)."""
    for entry in report.stages:
        print(failed_stage_line(entry), file=sys.stderr)


def tell(exc: BaseException, name: str | None = None, debug: bool = False) -> int:
    """Say on stderr what went wrong (the traceback first, on ``debug``); returns the
    exit code it means: 2 for a VarprobeError, 3 for a bug in varprobe."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    user = isinstance(exc, VarprobeError)  # one that no command caught
    print(f"varprobe: error: {exc}" if user else internal_line(exc, name), file=sys.stderr)
    return 2 if user else 3


@contextlib.contextmanager
def stage(name: str, report: Any = None,
          on_failure: Callable[[dict[str, str]], None] | None = None,
          expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run a stage of the pipeline. Given the ``report``, an isolated stage (predict,
    render, plot) that fails is recorded there and the caller goes on; otherwise its
    failure is an InternalError. ``on_failure(entry)`` hears of an isolated failure.
    ``expected``: exception types that are the user's to fix too (an OSError while
    writing), passed through like a VarprobeError."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}")
    try:
        yield
    except (VarprobeError, InternalError, *expected):
        raise
    except Exception as exc:
        if report is None or name not in ISOLATED:
            raise InternalError(name, exc) from exc
        record_failure(report, name, exc)
        if on_failure is not None:
            on_failure(report.stages[-1])


def record_failure(report: Any, name: str, exc: BaseException) -> None:
    """``report.stages`` gets the failed stage, for machines; ``report.notes`` a line;
    the "varprobe" logger the traceback (shown on --debug)."""
    logging.getLogger("varprobe").debug("the %s stage failed", name, exc_info=exc)
    report.stages.append({"stage": name, "error": type(exc).__name__,
                          "message": describe(exc).partition(": ")[2]})
    report.notes.append(f"the {name} stage failed ({describe(exc)}), a bug in varprobe "
                        f"({bug_report_hint()}); the rest of the report is complete")
    if name == "predict":
        clear_predictions(report, f"the predict stage failed: {describe(exc)}")


def clear_predictions(report: Any, reason: str) -> None:
    """Null every field the predict stage fills, with ``reason``: a half-finished
    prediction must not pass for a whole one."""
    for layer in report.layers:
        for key in LAYER_PREDICTIONS:
            setattr(layer, key, None)
        layer.schemes = {}
        layer.unavailable["predicted"] = reason
    report.summary.forward_ratio = report.summary.backward_ratio = None


def later_predictions(walker: Any, report: Any) -> Callable[[Any], None] | None:
    """``walker.add`` (theory's Counterfactuals: schemes walked when asked) as an
    isolated predict stage, as the first walk was; None when that walk failed."""
    if walker is None:
        return None

    def add(names: Any) -> None:
        with stage("predict", report):
            walker.add(names)
    return add
