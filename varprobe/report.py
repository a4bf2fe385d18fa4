"""The report: dataclasses, the ``varprobe.report/1`` JSON schema, frames and files.

Every number that could not be measured or predicted is ``None`` (JSON ``null``) and,
where it matters, the reason sits in ``Layer.unavailable`` under the field's name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "varprobe.report/1"
# Layer.unavailable["weight_grad_ratio"] of a weight that does not learn by design
FROZEN = "the weight is frozen (requires_grad=False)"
# Layer.reference of a layer held against the network input (varprobe.structure)
NETWORK_INPUT = "the network input"


@dataclass
class ForwardStats:
    """Moments of an activation tensor over all its elements (batch included)."""

    mean: float | None
    var: float | None
    second_moment: float | None
    zero_fraction: float | None = None
    dead_fraction: float | None = None
    nonfinite: int = 0


@dataclass
class BackwardStats:
    """Moments of a gradient tensor over all its elements."""

    var: float | None
    second_moment: float | None
    nonfinite: int = 0


@dataclass
class Prediction:
    """A predicted forward E[y^2] and backward Var[dL/dy]; ``basis`` says how.

    ``backward_input_var`` is the predicted Var[dL/dx] at the layer's input (compare
    with ``Layer.backward_input``); ``input_var`` the predicted E[x^2] of the input
    (basis "graph": e.g. the residual stream a norm layer reads; compare with
    ``Layer.input``); ``note`` names assumptions and measured values the prediction
    had to carry forward.
    """

    forward_var: float | None
    backward_var: float | None
    basis: str | None = None
    note: str | None = None
    backward_input_var: float | None = None
    input_var: float | None = None


@dataclass
class Flag:
    code: str
    severity: str  # "error" | "warning" | "info"
    message: str
    value: float | None = None  # the number the threshold was held against
    culprits: list[str] = field(default_factory=list)  # the layers behind it


@dataclass
class Layer:
    """One recorded call of one module."""

    index: int
    name: str
    call: int
    type: str
    kind: str  # "weight" | "activation" | "norm" | "other"
    shape: list[int] | None = None
    dtype: str | None = None
    input_shape: list[int] | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    effective_fan_in: float | None = None   # zero-padded borders and stride counted
    effective_fan_out: float | None = None
    weight_var: float | None = None
    weight_second_moment: float | None = None
    bias_second_moment: float | None = None
    bias_mean: float | None = None
    # E[w^4]/E[w^2]^2 of the weights' draw where predict recorded it (None: Gaussian)
    weight_kurtosis: float | None = None
    # sum over output units of (their weights' sum)^2, over sum w^2: 1 for independent
    # zero-mean draws, 0 where each unit's weights sum to zero (weight standardization);
    # measured where the layer's own forward computes its weight (None: 1)
    weight_row_share: float | None = None
    # mean over output units and positions of S^2, S the sum of a unit's weights over the
    # taps that touch real input: the gain of a mean every input shares (varprobe.mean_gain);
    # and of b S, the bias's cross term with it. Linear and convolutions, measured
    weight_mean_gain: float | None = None
    weight_bias_cross: float | None = None
    weight_grad_ratio: float | None = None
    activation: str | None = None       # the activation that follows (weight layers)
    gain: float | None = None           # its E[f(y)^2]/q
    backward_gain: float | None = None  # its E[f'(y)^2]
    input_activation: str | None = None  # the activation that feeds the layer
    input_gain: float | None = None
    forward_multiplier: float | None = None   # n E[w^2] g_prev: 1 holds the signal
    backward_multiplier: float | None = None  # n^ E[w^2] g'_next
    input: ForwardStats | None = None
    forward: ForwardStats | None = None
    backward: BackwardStats | None = None
    backward_input: BackwardStats | None = None
    predicted: Prediction | None = None
    local: Prediction | None = None
    schemes: dict[str, Prediction] = field(default_factory=dict)
    intervals: dict[str, list[float | None]] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    # structure (varprobe.structure): what the layer's input scale is held against
    reference: str | None = None                  # the label of that measured tensor
    reference_second_moment: float | None = None  # its E[x^2]
    stretch: int | None = None  # weight layers that share a reference: one stretch
    depth: int | None = None    # weight layers in series since the reference, itself included
    forks: bool | None = None   # its output is read by more than one operation
    rejoins: bool | None = None  # its output is added back onto the trunk it branched off
    # its input is exactly zero, made between modules by a learned factor at 0 (a gate)
    # that the gradient reaches: the gate moves at the first step and the zero is gone
    revives: bool | None = None
    calls: int = 1              # how often the module was called in the pass
    ranges: dict[str, dict] = field(default_factory=dict)  # precision.Ranges.to_dict

    @property
    def label(self) -> str:
        return self.name if self.call == 0 else f"{self.name}#{self.call}"


@dataclass
class TensorInfo:
    """The network's input or output: its shape, dtype and moments. ``indicator`` (the
    input only): every element is 0 or 1, a one-hot or multi-hot encoding that selects
    weights as token ids do, with no scale of its own (varprobe.structure)."""

    shape: list[int] | dict[str, list[int]] | None
    dtype: str | None
    mean: float | None
    var: float | None
    second_moment: float | None
    indicator: bool | None = None


@dataclass
class ModelInfo:
    target: str
    class_: str
    parameters: int


@dataclass
class Fix:
    """An init that varprobe predicts will fix the flagged trend, as runnable code."""

    scheme: str
    code: str                  # Python; ``model`` is the user's model, ``nn`` torch.nn
    short: str                 # the init call alone, for one-line output
    layers: list[str]          # the layers it re-initializes
    before: list[float | None]  # predicted end-to-end [forward, backward] ratio now
    after: list[float | None]   # ... and with the fix


@dataclass
class Summary:
    healthy: bool = True
    errors: int = 0
    warnings: int = 0
    forward_ratio: float | None = None
    backward_ratio: float | None = None
    verdict: str | None = None
    infos: int = 0
    culprits: list[str] = field(default_factory=list)  # the layers behind a trend
    cause: str | None = None
    fix: Fix | None = None
    output_reference: str | None = None  # what the network output's scale is held against

    def counts(self, sep: str = " · ") -> str:
        """The tally a verdict shows: "1 error · 4 warnings"."""
        return sep.join(f"{n} {word}{'s' * (n != 1)}"
                        for n, word in ((self.errors, "error"), (self.warnings, "warning")))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        data = dict(data)
        data["fix"] = Fix(**data["fix"]) if data.get("fix") else None
        return cls(**data)


@dataclass
class Report:
    model: ModelInfo
    settings: dict[str, Any]
    input: TensorInfo
    output: TensorInfo | None
    layers: list[Layer]
    summary: Summary = field(default_factory=Summary)
    notes: list[str] = field(default_factory=list)
    # stages.record_failure: {"stage", "error", "message"} per stage that failed
    stages: list[dict[str, str]] = field(default_factory=list)
    intervals: dict[str, list[float | None]] = field(default_factory=dict)  # input/output
    precision: dict[str, Any] | None = None  # range_flags: format, loss scale, autocast
    # theory.attend: per attention call, its logit variance, token correlation, sum p^2
    attention: list[dict[str, Any]] = field(default_factory=list)
    varprobe_version: str = ""
    torch_version: str = ""

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        model = raw["model"]
        raw["model"] = {"target": model["target"], "class": model["class_"],
                        "parameters": model["parameters"]}
        if raw["precision"] is None:  # range fields only when a precision option ran
            del raw["precision"]
        for layer in raw["layers"]:
            if not layer["ranges"]:
                del layer["ranges"]
            if layer["weight_kurtosis"] is None:  # only where predict recorded the init
                del layer["weight_kurtosis"]
            if layer["weight_row_share"] is None:  # only where the forward computes it
                del layer["weight_row_share"]
        ordered = {"schema": SCHEMA, "varprobe_version": raw.pop("varprobe_version"),
                   "torch_version": raw.pop("torch_version"), **raw}
        return _clean(ordered)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
        model = dict(data["model"])
        model["class_"] = model.pop("class")
        return cls(
            model=ModelInfo(**model),
            settings=data["settings"],
            input=TensorInfo(**data["input"]),
            output=TensorInfo(**data["output"]) if data.get("output") else None,
            layers=[_layer_from_dict(d) for d in data["layers"]],
            summary=Summary.from_dict(data["summary"]),
            notes=list(data.get("notes", [])),
            stages=list(data.get("stages", [])),
            intervals=dict(data.get("intervals", {})),
            precision=data.get("precision"),
            attention=list(data.get("attention", [])),
            varprobe_version=data.get("varprobe_version", ""),
            torch_version=data.get("torch_version", ""),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_frame(self):
        """One row per recorded layer call; nested fields become dotted columns."""
        import pandas as pd

        rows = []
        for layer in self.to_dict()["layers"]:
            flags = layer.pop("flags")
            layer.pop("unavailable")
            layer["flags"] = ",".join(f["code"] for f in flags)
            rows.append(layer)
        frame = pd.json_normalize(rows) if rows else pd.DataFrame()
        return frame.drop(columns=[c for c in frame.columns if c.startswith("intervals.")
                                   or (c.startswith("ranges.") and ".histogram" in c)])

    def save(self, path: str | os.PathLike, fmt: str | None = None) -> Path:
        """Write JSON or CSV (chosen by ``fmt`` or the extension), atomically."""
        path = Path(path)
        fmt = fmt or {".csv": "csv"}.get(path.suffix.lower(), "json")
        text = self.to_frame().to_csv(index=False) if fmt == "csv" else self.to_json() + "\n"
        write_atomic(path, text)
        return path

    # --- queries -------------------------------------------------------------------
    @property
    def weight_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.kind == "weight"]


def read(path: str | os.PathLike) -> Report:
    """``Report.load`` for a file the user names: every way it fails is one VarprobeError."""
    from varprobe.errors import VarprobeError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise VarprobeError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise VarprobeError(f"{path} is not a JSON report: it is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise VarprobeError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno}") from exc
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise VarprobeError(f"{path} is not a {SCHEMA} report (its schema is {schema!r}); "
                            "write one with `varprobe analyze ... -o report.json`")
    try:
        return Report.from_dict(data)
    except KeyError as exc:
        raise VarprobeError(f"{path} does not follow {SCHEMA}: missing field {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise VarprobeError(f"{path} does not follow {SCHEMA}: {exc}") from exc


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: never a half-written file."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide reports from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _clean(value: Any) -> Any:
    """NaN and inf are not JSON: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _layer_from_dict(d: dict[str, Any]) -> Layer:
    d = dict(d)
    for key, kind in (("input", ForwardStats), ("forward", ForwardStats),
                      ("backward", BackwardStats), ("backward_input", BackwardStats)):
        d[key] = kind(**d[key]) if d.get(key) else None
    for key in ("predicted", "local"):
        d[key] = Prediction(**d[key]) if d.get(key) else None
    d["schemes"] = {k: Prediction(**v) for k, v in d.get("schemes", {}).items()}
    d["flags"] = [Flag(**f) for f in d.get("flags", [])]
    names = {f.name for f in dataclasses.fields(Layer)}
    return Layer(**{k: v for k, v in d.items() if k in names})
