"""The init a model's own code applies, recorded while it is built on the meta device.

On meta an init op changes no values (there are none), so without this ``predict``
would see shapes only and have to assume each layer's PyTorch default. Under
``recording()`` every init op applied to a tensor is written down as the mean and
second moment it leaves there, the last write winning, exactly as the values would:

    normal_(m, s)          mean m, E[w^2] = m^2 + s^2
    uniform_(a, b)         mean (a+b)/2, E[w^2] = (a^2 + ab + b^2)/3
    trunc_normal_          the truncated normal's moments (not s^2: see _truncated)
    fill_(c), zero_        c, c^2
    orthogonal_(gain)      E[w^2] = gain^2 min(r, c)/(r c) for the (r, c) flattening
    eye_, dirac_           (number of ones)/numel
    mul_/div_/*=, add_     the scalar map applied to the moments
    copy_(src)             src's moments, where src was recorded
    torch.zeros/ones/full, randn/rand (and *_like)
                           0, 1, c; N(0, 1), U(0, 1): a tensor made for a parameter
    x * c, x / c, x + c    a new tensor with the scalar map of x's moments
    nn.Parameter(t)        t's moments

kaiming_*/xavier_*, constant_, ones_, zeros_ and the plain normal_/uniform_ of
torch.nn.init reach one of the Tensor methods above, so they are seen through them;
trunc_normal_, orthogonal_, eye_ and dirac_ return early on meta and are wrapped
themselves. ``p.data`` and views (``w[i]``, ``w.t()``) are followed back to the
parameter; a write to a part of it mixes the moments by the part's share. Any other
in-place write (``erfinv_``, ``clamp_``, item assignment, a tensor operand) leaves
moments no closed form gives: the tensor is marked unknown, with the op named.

Tensor methods and torch.nn.init functions are patched for the duration of the build
only and put back in ``finally``; only meta tensors are recorded.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

UNKNOWN = "an init op with no closed form here was applied to it"


@dataclass(frozen=True)
class Moments:
    """What the recorded ops leave in a tensor: its mean and E[w^2] (NaN: unknown),
    and the last op, for the report. ``kurt``: E[w^4]/E[w^2]^2 (how far a channel's
    sum of squared weights spreads: theory.chanspread), 3 (Gaussian) where not known."""

    mean: float
    m2: float
    op: str
    kurt: float = 3.0

    @property
    def known(self) -> bool:
        return math.isfinite(self.m2)

    @property
    def var(self) -> float:
        return max(0.0, self.m2 - self.mean * self.mean)


def _unknown(op: str) -> Moments:
    return Moments(math.nan, math.nan, op)


class Log:
    """Recorded moments by tensor; ``moments(p)`` reads them after the build."""

    def __init__(self) -> None:
        self._moments: dict[int, Moments] = {}
        self._roots: dict[int, torch.Tensor] = {}  # alias (p.data) id -> the parameter
        self._keep: list[torch.Tensor] = []  # holds every keyed tensor: ids stay unique
        self._depth = 0  # > 0 inside a wrapped init function: its inner ops are its own
        self.active = True  # a wrapper captured by code imported during the build outlives it

    def moments(self, t: torch.Tensor | None) -> Moments | None:
        """The moments recorded for ``t`` (None: nothing recorded)."""
        return None if t is None else self._moments.get(id(self._root(t)))

    def __len__(self) -> int:
        return len(self._moments)

    def constants(self, tensors: list[torch.Tensor]) -> dict[int, list[float]]:
        """Host values (theory.Values) of the tensors a constant fill left whole
        (ones_, zeros_, constant_, fill_: a norm's scale, a PReLU slope, running
        statistics): those are known element by element, not only in moments. A 1-D one
        drawn at random (a norm's γ ~ N(0, 0.02)) stands as two values with its mean and
        E[x²], which is what the closed forms read of it (mean γ², mean β, the PReLU
        gain (1 + E[a²])/2)."""
        out = {}
        for t in tensors:
            m = self.moments(t)
            if m is None or not m.known:
                continue
            if m.var == 0.0:
                out[id(t)] = [m.mean]
            elif t.dim() == 1:
                sd = math.sqrt(m.var)
                out[id(t)] = [m.mean - sd, m.mean + sd]
        return out

    # --- recording ------------------------------------------------------------------

    def alias(self, alias: torch.Tensor, of: torch.Tensor) -> None:
        if alias is not of:
            self._keep += [alias, of]
            self._roots[id(alias)] = self._root(of)

    def write(self, t: torch.Tensor, new: Moments) -> None:
        """``t`` (or the part of a parameter it views) now holds ``new``."""
        self._update(t, lambda _: new)

    def scale(self, t: torch.Tensor, c: float, shift: float, op: str) -> None:
        """x -> c x + shift on every element of ``t``."""
        self._update(t, lambda old: _unknown(f"{op} of a tensor with no recorded init")
                     if old is None else Moments(
                         c * old.mean + shift,
                         c * c * old.m2 + 2 * c * shift * old.mean + shift * shift, op,
                         old.kurt if shift == 0 else 3.0))

    def _update(self, t: torch.Tensor, fn: Callable[[Moments | None], Moments]) -> None:
        if self._depth or not self.active or not getattr(t, "is_meta", False):
            return
        root = self._root(t)
        old = self._moments.get(id(root))
        new = fn(old)
        share = t.numel() / root.numel() if root.numel() else 1.0
        if share < 1.0:  # a part: the rest keeps what it had
            if old is None:
                new = _unknown(f"{new.op} on a part of a tensor with no recorded init")
            else:
                new = Moments((1 - share) * old.mean + share * new.mean,
                              (1 - share) * old.m2 + share * new.m2, new.op)
        self._keep.append(root)
        self._moments[id(root)] = new

    def _root(self, t: torch.Tensor) -> torch.Tensor:
        seen = 0
        while seen < 64:  # a view chain is short; the bound only guards a cycle
            nxt = self._roots.get(id(t))
            if nxt is None:
                nxt = t._base if isinstance(t, torch.Tensor) else None
            if nxt is None:
                return t
            t, seen = nxt, seen + 1
        return t

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1


# --- the moments of each op ---------------------------------------------------------

def _scalar(value: object) -> float | None:
    """A Python number, or None (a tensor operand: its values are not known here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: object) -> object:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _normal(args, kwargs) -> Moments:
    m = _scalar(_arg(args, kwargs, 0, "mean", 0.0))
    s = _scalar(_arg(args, kwargs, 1, "std", 1.0))
    if m is None or s is None:
        return _unknown("normal_ with a tensor mean or std")
    m2 = m * m + s * s
    m4 = m ** 4 + 6 * m * m * s * s + 3 * s ** 4
    return Moments(m, m2, f"normal_(mean={m:.4g}, std={s:.4g})", _kurt(m4, m2))


def _uniform(args, kwargs) -> Moments:
    a = _scalar(_arg(args, kwargs, 0, "from", 0.0))
    b = _scalar(_arg(args, kwargs, 1, "to", 1.0))
    if a is None or b is None:
        return _unknown("uniform_ with tensor bounds")
    m2 = (a * a + a * b + b * b) / 3
    m4 = (a ** 4 + a ** 3 * b + a * a * b * b + a * b ** 3 + b ** 4) / 5  # (b^5 - a^5)/5(b - a)
    return Moments((a + b) / 2, m2, f"uniform_({a:.4g}, {b:.4g})", _kurt(m4, m2))


def _kurt(m4: float, m2: float) -> float:
    return m4 / (m2 * m2) if m2 > 0 else 3.0


def _fill(args, kwargs) -> Moments:
    c = _scalar(_arg(args, kwargs, 0, "value", None))
    if c is None:
        return _unknown("fill_ with a tensor value")
    return Moments(c, c * c, f"fill_({c:.4g})", 1.0)


def truncated(mean: float, std: float, a: float, b: float) -> tuple[float, float]:
    """(E[w], E[w^2]) of N(mean, std^2) truncated to [a, b]: with alpha, beta the
    standardized bounds and Z = Phi(beta) - Phi(alpha), E[w] = mean + std (phi(alpha) -
    phi(beta))/Z and Var[w] = std^2 (1 + (alpha phi(alpha) - beta phi(beta))/Z -
    ((phi(alpha) - phi(beta))/Z)^2). trunc_normal_(std=1) on its default [-2, 2] has
    Var 0.774, not 1; timm's trunc_normal_(std=.02) on [-2, 2] keeps std^2."""
    def phi(x: float) -> float:
        return 0.0 if math.isinf(x) else math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cdf(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    alpha, beta = (a - mean) / std, (b - mean) / std
    z = cdf(beta) - cdf(alpha)
    d = (phi(alpha) - phi(beta)) / z
    xa = 0.0 if math.isinf(alpha) else alpha * phi(alpha)
    xb = 0.0 if math.isinf(beta) else beta * phi(beta)
    m = mean + std * d
    var = std * std * (1 + (xa - xb) / z - d * d)
    return m, var + m * m


def _trunc_normal(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, **_) -> Moments:
    m, m2 = truncated(float(mean), float(std), float(a), float(b))
    return Moments(m, m2, f"trunc_normal_(mean={mean:.4g}, std={std:.4g}, a={a:.4g}, b={b:.4g})")


def _orthogonal(tensor, gain=1.0, **_) -> Moments:
    rows = tensor.shape[0]
    cols = tensor.numel() // rows
    return Moments(0.0, gain * gain * min(rows, cols) / (rows * cols),
                   f"orthogonal_(gain={gain:.4g})")


def _eye(tensor, **_) -> Moments:
    share = min(tensor.shape) / tensor.numel()
    return Moments(share, share, "eye_")


def _dirac(tensor, groups=1, **_) -> Moments:
    ones = groups * min(tensor.shape[0] // groups, tensor.shape[1])
    return Moments(ones / tensor.numel(), ones / tensor.numel(), f"dirac_(groups={groups})")


# Tensor methods whose moments are known: name -> (args, kwargs) -> Moments.
WRITES = {"normal_": _normal, "uniform_": _uniform, "fill_": _fill,
          "zero_": lambda args, kwargs: Moments(0.0, 0.0, "zero_")}
# Scalings x -> c x + shift: name -> (c, shift) from the operand.
SCALINGS = {"mul_": lambda v: (v, 0.0), "__imul__": lambda v: (v, 0.0),
            "div_": lambda v: (1.0 / v, 0.0), "__itruediv__": lambda v: (1.0 / v, 0.0),
            "add_": lambda v: (1.0, v), "__iadd__": lambda v: (1.0, v),
            "sub_": lambda v: (1.0, -v), "__isub__": lambda v: (1.0, -v)}
# Other in-place writes: moments no closed form here gives.
OPAQUE = ("addcmul_", "addcdiv_", "clamp_", "clamp_min_", "clamp_max_", "clip_", "erfinv_",
          "exp_", "log_", "abs_", "sqrt_", "pow_", "neg_", "sign_", "tanh_", "sigmoid_",
          "random_", "bernoulli_", "exponential_", "cauchy_", "log_normal_", "geometric_",
          "masked_fill_", "index_fill_", "index_copy_", "index_add_", "scatter_",
          "scatter_add_", "masked_scatter_", "put_", "lerp_", "fmod_", "remainder_",
          "round_", "__setitem__", "__ipow__")
# Factories: name -> (args, kwargs) -> Moments of what they make.
FACTORIES = {"zeros": lambda a, k: Moments(0.0, 0.0, "torch.zeros"),
             "ones": lambda a, k: Moments(1.0, 1.0, "torch.ones"),
             "randn": lambda a, k: Moments(0.0, 1.0, "torch.randn"),
             "rand": lambda a, k: Moments(0.5, 1.0 / 3.0, "torch.rand")}
FACTORIES.update({f"{name}_like": fn for name, fn in FACTORIES.items()})
FACTORIES["full"] = FACTORIES["full_like"] = lambda a, k: _fill(a[1:], {
    "value": k.get("fill_value", a[1] if len(a) > 1 else math.nan)})
# Out-of-place maps x -> c x + shift by a scalar (x * c, c * x, x / c, x + c, x - c reach
# a torch function of these names): name -> (c, shift) from the operand.
MAPS = {"mul": SCALINGS["mul_"], "div": SCALINGS["div_"], "true_divide": SCALINGS["div_"],
        "add": SCALINGS["add_"], "sub": SCALINGS["sub_"]}
# torch.nn.init functions that return early on meta (or write through an `out=`).
FUNCTIONS = {"trunc_normal_": _trunc_normal, "orthogonal_": _orthogonal, "eye_": _eye,
             "dirac_": _dirac}


# --- the patches --------------------------------------------------------------------

@contextlib.contextmanager
def recording() -> Iterator[Log]:
    """Record the init ops applied to meta tensors while the block runs."""
    log = Log()
    saved: list[tuple[object, str, object]] = []
    stack = contextlib.ExitStack()

    def patch(owner: object, name: str, new: object) -> None:
        saved.append((owner, name, owner.__dict__.get(name, _ABSENT)
                      if isinstance(owner, type) else getattr(owner, name)))
        setattr(owner, name, new)

    try:
        for name, moments in WRITES.items():
            patch(torch.Tensor, name, _method(log, getattr(torch.Tensor, name), moments))
        for name, factors in SCALINGS.items():
            patch(torch.Tensor, name, _scaling(log, getattr(torch.Tensor, name), name, factors))
        for name in OPAQUE:
            patch(torch.Tensor, name, _opaque(log, getattr(torch.Tensor, name), name))
        patch(torch.Tensor, "copy_", _copy(log, torch.Tensor.copy_))
        patch(torch.Tensor, "data", _data_property(log))
        patch(torch.nn.Parameter, "__new__", _parameter(log, torch.nn.Parameter.__new__))
        made = stack.enter_context(_Made(log))
        for owner in _init_tables():
            for name, moments in FUNCTIONS.items():
                original = owner[name] if isinstance(owner, dict) else getattr(owner, name)
                wrapped = _function(log, original, moments)
                if isinstance(owner, dict):
                    saved.append((owner, name, original))
                    owner[name] = wrapped
                else:
                    patch(owner, name, wrapped)
        del made
        yield log
    finally:
        stack.close()
        log.active = False
        for owner, name, old in reversed(saved):
            if isinstance(owner, dict):
                owner[name] = old
            elif old is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        for table in _init_tables():  # imported during the build: it holds the wrappers
            if isinstance(table, dict):
                for name, fn in table.items():
                    table[name] = getattr(fn, "__varprobe_original__", fn)


_ABSENT = object()
_DATA = torch._C.TensorBase.__dict__["data"]


def _init_tables() -> list[object]:
    """torch.nn.init, and the tables that hold its functions by reference (transformers
    keeps them in a dict, read at call time)."""
    tables: list[object] = [torch.nn.init]
    hf = sys.modules.get("transformers.initialization")
    table = getattr(hf, "TORCH_INIT_FUNCTIONS", None)
    if isinstance(table, dict) and all(name in table for name in FUNCTIONS):
        tables.append(table)
    return tables


def _method(log: Log, original: Callable, moments: Callable) -> Callable:
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if self.is_meta:
            log.write(self, moments(args, kwargs))
        with log.inside():
            return original(self, *args, **kwargs)
    return method


def _scaling(log: Log, original: Callable, name: str, factors: Callable) -> Callable:
    @functools.wraps(original)
    def method(self, other, *args, **kwargs):
        if self.is_meta:
            value = _scalar(other)
            alpha = _scalar(kwargs.get("alpha", args[0] if args else 1))
            if value is None or alpha is None or (value == 0 and "div" in name):
                log.write(self, _unknown(f"{name} with a tensor operand"))
            else:
                c, shift = factors(value)
                log.scale(self, c, shift * alpha, f"{name}({value:.4g})")
        with log.inside():
            return original(self, other, *args, **kwargs)
    return method


def _opaque(log: Log, original: Callable, name: str) -> Callable:
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if self.is_meta:
            log.write(self, _unknown(name))
        with log.inside():
            return original(self, *args, **kwargs)
    return method


class _Made(TorchFunctionMode):
    """Tensors made for parameters: a factory's (torch.zeros, torch.randn, ...) moments,
    and x * c, x / c, x + c of a recorded x. A mode, not patched functions: torch's
    device context recognizes its factories by identity (and caches them)."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log
        self.factories = {getattr(torch, name): fn for name, fn in FACTORIES.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not out.is_meta \
                or not out.is_floating_point():
            return out
        if func in self.factories:
            self.log.write(out, self.factories[func](args, kwargs))
        elif getattr(func, "__name__", "") in MAPS and args and "rounding_mode" not in kwargs:
            self._mapped(func.__name__, args, kwargs, out)
        return out

    def _mapped(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        value = _scalar(args[1]) if len(args) > 1 else None
        alpha = _scalar(kwargs.get("alpha", 1))
        old = self.log.moments(args[0]) if isinstance(args[0], torch.Tensor) else None
        if old is None or value is None or alpha is None or (value == 0 and "div" in name):
            return
        c, shift = MAPS[name](value)
        shift *= alpha
        self.log.write(out, Moments(c * old.mean + shift, c * c * old.m2
                                    + 2 * c * shift * old.mean + shift * shift,
                                    f"{old.op} {name} {value:.4g}",
                                    old.kurt if shift == 0 else 3.0))


def _parameter(log: Log, original: Callable) -> Callable:
    def new(cls, data=None, requires_grad=True):
        p = original(cls, data, requires_grad)
        if isinstance(data, torch.Tensor) and log.moments(data) is not None:
            log.alias(p, data)
        return p
    return new


def _copy(log: Log, original: Callable) -> Callable:
    @functools.wraps(original)
    def copy_(self, src, *args, **kwargs):
        if self.is_meta:
            known = log.moments(src) if isinstance(src, torch.Tensor) else None
            log.write(self, known if known is not None and src.numel() == self.numel()
                      else _unknown("copy_ from a tensor with no recorded init"))
        with log.inside():
            return original(self, src, *args, **kwargs)
    return copy_


def _data_property(log: Log) -> property:
    def get(self):
        data = _DATA.__get__(self)
        if self.is_meta:
            log.alias(data, self)
        return data

    return property(get, lambda self, value: _DATA.__set__(self, value))


def _function(log: Log, original: Callable, moments: Callable) -> Callable:
    @functools.wraps(original)
    def init(tensor, *args, **kwargs):
        if log.active and getattr(tensor, "is_meta", False):
            bound = _bind(original, tensor, args, kwargs)
            log.write(tensor, moments(tensor, **bound))
        with log.inside():
            return original(tensor, *args, **kwargs)
    init.__varprobe_original__ = original
    return init


def _bind(fn: Callable, tensor, args: tuple, kwargs: dict) -> dict:
    import inspect

    bound = inspect.signature(fn).bind(tensor, *args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "tensor"}


def run_skipped_init(model: torch.nn.Module) -> None:
    """Run the init that a builder skips on meta, under the recording.

    transformers' ``init_weights`` does not call ``_init_weights`` when the default
    device is meta (there are no values to fill); on any other device it does. Calling
    ``initialize_weights`` on the outermost pretrained models of the meta build records
    what a real build draws. It writes no values (meta) and changes nothing else.
    """
    hf = sys.modules.get("transformers.modeling_utils")
    base = getattr(hf, "PreTrainedModel", None)
    if base is None:
        return
    done: set[int] = set()
    for module in model.modules():
        if id(module) in done or not isinstance(module, base):
            continue
        params = list(module.parameters())
        run = getattr(module, "initialize_weights", None)  # transformers >= 5
        if run is not None and params and all(p.is_meta for p in params):
            run()
        done.update(id(m) for m in module.modules())
