"""Settings: defaults < ``[tool.varprobe]`` in pyproject.toml < command-line options.

The pyproject.toml is the first one found walking up from the current directory.
Importing this module stays cheap (no torch): the CLI resolves settings before it
loads a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from varprobe.diagnose.thresholds import SEVERITIES, Thresholds
from varprobe.errors import VarprobeError

FAIL_ON = (*SEVERITIES, "never")
DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class Settings:
    thresholds: Thresholds = field(default_factory=Thresholds)
    ignore: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    fail_on: str = "error"
    source: str | None = None  # the pyproject.toml that contributed, if any

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds.to_dict(), "ignore": list(self.ignore),
                "seed": self.seed, "batch_size": self.batch_size, "fail_on": self.fail_on,
                "config": self.source}


KEYS = ("thresholds", "ignore", "seed", "batch_size", "fail_on")


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml in ``start`` (default: cwd) or a parent folder."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def read_section(path: Path) -> dict[str, Any]:
    """``[tool.varprobe]`` of ``path`` ({} when absent); a VarprobeError when the file
    does not parse."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise VarprobeError(f"cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise VarprobeError(f"{path}: not valid TOML: {exc}") from exc
    section = data.get("tool", {}).get("varprobe", {})
    if not isinstance(section, dict):
        raise VarprobeError(f"{path}: [tool.varprobe] must be a table")
    return section


def apply(settings: Settings, values: Mapping[str, Any], where: str) -> Settings:
    """``settings`` with ``values`` (pyproject keys) applied, every value checked."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in KEYS:
            raise VarprobeError(f"{where}: unknown key {key!r} (valid: {', '.join(KEYS)})")
        changes[key] = _checked(settings, key, value, where)
    return dataclasses.replace(settings, **changes)


def _checked(settings: Settings, key: str, value: Any, where: str) -> Any:
    if key == "thresholds":
        if not isinstance(value, Mapping):
            raise VarprobeError(f"{where}: 'thresholds' must be a table of "
                                f"{', '.join(Thresholds.names())}")
        return settings.thresholds.updated(value, f"{where}: thresholds")
    if key == "ignore":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise VarprobeError(f"{where}: 'ignore' must be a list of layer-name patterns")
        return tuple(value)
    if key == "fail_on":
        if value not in FAIL_ON:
            raise VarprobeError(f"{where}: 'fail_on' must be one of {', '.join(FAIL_ON)}, "
                                f"not {value!r}")
        return value
    least = 0 if key == "seed" else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise VarprobeError(f"{where}: {key!r} must be an integer >= {least}, not {value!r}")
    return value


def resolve(cli: Mapping[str, Any], start: Path | None = None) -> Settings:
    """Defaults, then the nearest pyproject.toml, then the command-line values that were
    given (None means not given; ``threshold`` overrides single thresholds)."""
    settings = Settings()
    path = find_pyproject(start)
    if path is not None:
        section = read_section(path)
        if section:
            settings = apply(settings, section, f"{path} [tool.varprobe]")
            settings = dataclasses.replace(settings, source=str(path))
    given = {k: v for k, v in cli.items() if v is not None and k != "threshold"}
    if given.get("ignore") == ():
        given.pop("ignore")
    settings = apply(settings, given, "command line")
    if cli.get("threshold"):
        thresholds = settings.thresholds.updated(parse_thresholds(cli["threshold"]),
                                                 "--threshold")
        settings = dataclasses.replace(settings, thresholds=thresholds)
    return settings


def parse_thresholds(items: list[str]) -> dict[str, Any]:
    """``["forward=1e-3,1e3", "dead_units=0.7"]`` -> {"forward": [1e-3, 1e3], ...}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        try:
            numbers = [float(p) for p in text.split(",")] if sep else []
        except ValueError:
            numbers = []
        if not numbers:
            raise VarprobeError(f"--threshold {item!r}: write KEY=VALUE or KEY=LOW,HIGH, "
                                "e.g. forward=1e-3,1e3")
        out[key.strip()] = numbers[0] if len(numbers) == 1 else numbers
    return out
