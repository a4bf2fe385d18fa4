"""A checker for the ``varprobe.report/1`` JSON schema, used by tests."""

from __future__ import annotations

import json
from typing import Any

NUM = (int, float, type(None))


def _check(obj: dict, keys: dict[str, tuple], where: str) -> None:
    for key, types in keys.items():
        assert key in obj, f"{where}: missing {key!r}"
        assert isinstance(obj[key], types), f"{where}.{key}: {type(obj[key]).__name__}"


def check_report(data: dict[str, Any]) -> None:
    """Raise AssertionError if ``data`` does not follow varprobe.report/1."""
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN or inf anywhere
    assert data["schema"] == "varprobe.report/1"
    _check(data, {"varprobe_version": (str,), "torch_version": (str,), "model": (dict,),
                  "settings": (dict,), "input": (dict,), "layers": (list,),
                  "summary": (dict,)}, "report")
    _check(data["model"], {"target": (str,), "class": (str,), "parameters": (int,)}, "model")
    _check(data["settings"], {"seed": (int,), "trials": (int,), "batch_size": (int, type(None)),
                              "device": (str,), "mode": (str,), "init": (str,),
                              "grad": (str,)}, "settings")
    _check(data["input"], {"shape": (list, dict, type(None)), "dtype": (str, type(None)),
                           "mean": NUM, "var": NUM, "second_moment": NUM,
                           "indicator": (bool, type(None))}, "input")
    _check(data["summary"], {"healthy": (bool,), "errors": (int,), "warnings": (int,),
                             "forward_ratio": NUM, "backward_ratio": NUM}, "summary")
    for i, layer in enumerate(data["layers"]):
        _check_layer(layer, f"layers[{i}]")


def _check_layer(layer: dict, where: str) -> None:
    _check(layer, {"index": (int,), "name": (str,), "call": (int,), "type": (str,),
                   "kind": (str,), "shape": (list, type(None)), "fan_in": (int, type(None)),
                   "fan_out": (int, type(None)), "weight_var": NUM,
                   "activation": (str, type(None)), "gain": NUM,
                   "forward": (dict, type(None)), "backward": (dict, type(None)),
                   "predicted": (dict, type(None)), "schemes": (dict,),
                   "flags": (list,)}, where)
    assert layer["kind"] in ("weight", "activation", "norm", "other"), where
    if layer["forward"] is not None:
        _check(layer["forward"], {"mean": NUM, "var": NUM, "second_moment": NUM,
                                  "zero_fraction": NUM, "dead_fraction": NUM,
                                  "nonfinite": (int,)}, f"{where}.forward")
    if layer["backward"] is not None:
        _check(layer["backward"], {"var": NUM, "second_moment": NUM, "nonfinite": (int,)},
               f"{where}.backward")
    if layer["predicted"] is not None:
        _check(layer["predicted"], {"basis": (str, type(None)), "forward_var": NUM,
                                    "backward_var": NUM}, f"{where}.predicted")
        assert layer["predicted"]["basis"] in ("local", "chain", "graph", None), where
    for name, scheme in layer["schemes"].items():
        _check(scheme, {"forward_var": NUM, "backward_var": NUM}, f"{where}.schemes.{name}")
    for flag in layer["flags"]:
        _check(flag, {"code": (str,), "severity": (str,), "message": (str,)}, f"{where}.flag")
        assert flag["severity"] in ("error", "warning", "info"), where
