"""Turn "model.py", "model.py:NAME" or "pkg.module:NAME" into a model and its extras.

Loading a model file runs its code, like pytest importing a test file does.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from varprobe.errors import VarprobeError

DEFAULT_NAMES = ("model", "build_model")


@dataclass
class Target:
    """What a model file provides: the module, and optionally an input and a loss."""

    spec: str
    model: Any  # nn.Module; typed loosely so that importing this file stays cheap
    example_input: Any = None  # tensor / tuple / dict, or callable(batch_size)
    loss: Any = None  # callable(output) -> scalar tensor


def split_spec(spec: str) -> tuple[str, str | None]:
    """("path/model.py", "NAME") or ("pkg.module", "NAME"); NAME may be None."""
    head, sep, name = spec.rpartition(":")
    # A Windows drive ("C:\\x.py") or no colon at all: the whole spec is the location.
    if not sep or (len(head) == 1 and head.isalpha()) or not name.isidentifier():
        return spec, None
    return head, name


def load(spec: str, device: str | None = None, seed: int | None = None) -> Target:
    """Import the target and build its model; ``device`` (e.g. "meta") is the default
    device while the file runs and the model is built: shapes without memory. The file
    is imported under it too, since module-level code may build the model. ``seed``
    seeds torch's RNG for the import and the build, so that weights the file draws
    repeat from run to run (a baseline then compares like with like); the caller's RNG
    state is restored afterwards."""
    location, name = split_spec(spec)
    with _seeded(seed), _default_device(device):
        module = _import(location)
        where = location
        obj_name, obj = _find(module, name, where)
        model = _instantiate(obj, obj_name, where)
    return Target(spec=spec, model=model,
                  example_input=getattr(module, "example_input", None),
                  loss=getattr(module, "loss", None))


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _default_device(device: str | None) -> contextlib.AbstractContextManager:
    if device is None:
        return contextlib.nullcontext()
    import torch

    return torch.device(device)


def _import(location: str) -> ModuleType:
    path = Path(location)
    if location.endswith(".py") or path.exists() or "/" in location:
        return _import_file(path)
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as exc:
        if exc.name and location.startswith(exc.name):
            raise VarprobeError(f"{location}: no such file or importable module; "
                                "give a path to a .py file or package.module:NAME") from exc
        raise VarprobeError(f"{location}: it imports {exc.name!r}, which is not installed; "
                            "install it or fix the import") from exc
    except SyntaxError as exc:
        raise VarprobeError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from exc


def _import_file(path: Path) -> ModuleType:
    if not path.exists():
        raise VarprobeError(f"{path}: no such file; check the path")
    if path.is_dir() or path.suffix != ".py":
        raise VarprobeError(f"{path}: not a Python file; give a .py model file")
    name = f"varprobe_target_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up here
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # sibling imports ("from helpers import K") work
    argv, sys.argv = sys.argv, [str(path)]  # as run alone: its own argparse sees no flags
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise VarprobeError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except ModuleNotFoundError as exc:
        sys.modules.pop(name, None)
        raise VarprobeError(f"{path}: it imports {exc.name!r}, which is not installed; "
                            "install it or fix the import") from exc
    except SystemExit as exc:  # a script's sys.exit() or argparse, at import
        sys.modules.pop(name, None)
        raise VarprobeError(f"{path}: exited while importing (SystemExit {exc.code}); put "
                            "the script's own code under `if __name__ == \"__main__\":`"
                            ) from None
    except Exception as exc:
        sys.modules.pop(name, None)
        raise VarprobeError(f"{path}: raised while importing: "
                            f"{type(exc).__name__}: {exc}") from exc
    finally:
        sys.argv = argv
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _candidates(module: ModuleType) -> list[str]:
    """Module-level nn.Module instances and subclasses defined in the file."""
    from torch import nn

    found = []
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if isinstance(value, nn.Module) or (inspect.isclass(value) and issubclass(value, nn.Module)
              and value.__module__ == module.__name__):
            found.append(key)
    return found


def _find(module: ModuleType, name: str | None, where: str) -> tuple[str, Any]:
    if name is not None:
        if not hasattr(module, name):
            options = ", ".join(_candidates(module)) or "none"
            raise VarprobeError(f"{where}: no {name!r} in it (models found: {options})")
        return name, getattr(module, name)
    for key in DEFAULT_NAMES:
        if hasattr(module, key):
            return key, getattr(module, key)
    found = _candidates(module)
    if len(found) == 1:
        return found[0], getattr(module, found[0])
    if not found:
        raise VarprobeError(f"{where}: no model found; define `model` or `build_model()`, "
                            "or name one with FILE:NAME")
    raise VarprobeError(f"{where}: several models found ({', '.join(found)}); "
                        f"pick one with {where}:NAME")


def _instantiate(obj: Any, name: str, where: str) -> Any:
    from torch import jit, nn

    if inspect.isclass(obj) and issubclass(obj, nn.Module) or (
            callable(obj) and not isinstance(obj, nn.Module)):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise VarprobeError(f"{where}:{name} needs constructor arguments; define "
                                "`build_model()` that returns a configured model") from None
        except ValueError:
            pass
        try:
            obj = obj()
        except Exception as exc:
            raise VarprobeError(f"{where}:{name}() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, jit.ScriptModule):
        raise VarprobeError(f"{where}:{name} is a TorchScript module; hooks do not run inside "
                            "TorchScript, so give the eager nn.Module instead")
    if not isinstance(obj, nn.Module):
        raise VarprobeError(f"{where}:{name} is a {type(obj).__name__}, not an nn.Module")
    return obj
