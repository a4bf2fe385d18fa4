"""``predict`` on meta sees the model's own init (varprobe.initlog).

Every expected value is measured: the same init code run on real CPU tensors, or the
same model file built on the CPU and its weights read. Sampling noise sets the
tolerances: the mean of w^2 over N draws has relative sd sqrt(Var[w^2]/N)/E[w^2],
which is sqrt(2/N) for a Gaussian (kurtosis 3) and less for a uniform (sqrt(0.8/N))
or a truncated Gaussian; every bound below is 6 such sd (a false alarm once in 5e8).
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch import nn

from varprobe import initlog, mean_gain, target
from varprobe.predict import predict, predict_target
from varprobe.recorder import main_weight

SD = 6  # standard deviations of sampling noise a bound allows


def tol(n: int) -> float:
    """6 sd of the relative error of mean(w^2) over n Gaussian draws."""
    return SD * math.sqrt(2 / n)


INITS = {  # name -> init code on a (256, 512) weight w (and its module m)
    "normal": lambda w, m: nn.init.normal_(w, 0.1, 0.3),
    "uniform": lambda w, m: nn.init.uniform_(w, -0.2, 0.5),
    "trunc_normal std 1 (truncated)": lambda w, m: nn.init.trunc_normal_(w, std=1.0),
    "trunc_normal std .02": lambda w, m: nn.init.trunc_normal_(w, std=0.02),
    "trunc_normal one-sided": lambda w, m: nn.init.trunc_normal_(w, mean=0.5, std=1, a=0),
    "kaiming_normal fan_out": lambda w, m: nn.init.kaiming_normal_(w, mode="fan_out"),
    "kaiming_uniform (default)": lambda w, m: m.reset_parameters(),
    "xavier_uniform": lambda w, m: nn.init.xavier_uniform_(w, gain=1.5),
    "orthogonal": lambda w, m: nn.init.orthogonal_(w, gain=2.0),
    "eye": lambda w, m: nn.init.eye_(w),
    "constant": lambda w, m: nn.init.constant_(w, 0.25),
    ".data scaled": lambda w, m: (w.data.normal_(0, 0.02), w.data.mul_(3), w.data.div_(2)),
    "*= and +=": lambda w, m: _inplace(w),
    "row zeroed": lambda w, m: (nn.init.normal_(w), w.data[:64].zero_()),
    "transposed view": lambda w, m: w.t().uniform_(-1, 1),
}


def _inplace(w):
    with torch.no_grad():
        w.normal_(0, 0.5)
        w *= 0.5
        w += 0.1


def _build(device: str, init) -> nn.Linear:
    with torch.device(device):
        m = nn.Linear(512, 256)
    with torch.no_grad():
        init(m.weight, m)
    return m


@pytest.mark.parametrize("name", INITS)
def test_recorded_moments_equal_a_real_draw(name):
    torch.manual_seed(0)
    real = _build("cpu", INITS[name]).weight.detach().double()
    with initlog.recording() as log:
        meta = _build("meta", INITS[name])
    got = log.moments(meta.weight)
    assert got is not None and got.known, got
    # A Gaussian's sd bound covers the lighter-tailed draws here; eye/orthogonal/
    # constant are exact up to float32 rounding.
    assert got.m2 == pytest.approx(real.pow(2).mean().item(), rel=tol(real.numel()))
    assert got.mean == pytest.approx(real.mean().item(), abs=SD * math.sqrt(got.m2 / real.numel()))


MADE = {  # name -> a parameter made from a tensor factory, as ViTs make [CLS] and positions
    "zeros": lambda: nn.Parameter(torch.zeros(256, 512)),
    "randn * 0.02": lambda: nn.Parameter(torch.randn(256, 512) * 0.02),
    "0.1 * randn": lambda: nn.Parameter(0.1 * torch.randn(256, 512)),
    "ones * 2 + 1": lambda: nn.Parameter(torch.ones(256, 512) * 2 + 1),
    "rand / 2 - 0.1": lambda: nn.Parameter(torch.rand(256, 512) / 2 - 0.1),
    "full(0.5)": lambda: nn.Parameter(torch.full((256, 512), 0.5)),
    "randn_like": lambda: nn.Parameter(torch.randn_like(torch.empty(256, 512))),
}


@pytest.mark.parametrize("name", MADE)
def test_parameters_made_by_factories(name):
    torch.manual_seed(0)
    with torch.device("cpu"):
        real = MADE[name]().detach().double()
    with initlog.recording() as log, torch.device("meta"):
        meta = MADE[name]()
    assert meta.is_meta
    got = log.moments(meta)
    assert got is not None and got.known, got
    assert got.m2 == pytest.approx(real.pow(2).mean().item(), rel=tol(real.numel()), abs=1e-12)
    assert got.mean == pytest.approx(real.mean().item(), abs=SD * math.sqrt(got.m2 / real.numel()))


def test_the_device_context_still_makes_meta_tensors_after_a_recording():
    """torch's device context knows its factories by identity and caches them: the
    recording must not put anything of its own in their place."""
    new = nn.Parameter.__new__
    with initlog.recording(), torch.device("meta"):
        assert torch.zeros(2).is_meta and nn.Parameter(torch.randn(2)).is_meta
    with torch.device("meta"):
        assert torch.zeros(2).is_meta and torch.randn(3).is_meta
    assert nn.Parameter.__new__ is new


def test_trunc_normal_is_not_its_untruncated_variance():
    with initlog.recording() as log:
        w = torch.empty(100, device="meta")
        nn.init.trunc_normal_(w, std=1.0)  # on [-2, 2]: Var = 0.7737, not 1
    assert log.moments(w).m2 == pytest.approx(0.77374, abs=1e-5)


def test_a_copy_from_another_parameter_and_an_opaque_op():
    with initlog.recording() as log:
        with torch.device("meta"):
            a, b, c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        with torch.no_grad():
            nn.init.normal_(a.weight, std=0.1)
            b.weight.copy_(a.weight)
            c.weight.erfinv_()
            d = nn.Parameter(torch.empty(4, 4, device="meta"))  # empty: no values drawn
            d.data.mul_(2.0)
    assert log.moments(b.weight).m2 == pytest.approx(0.01)
    assert not log.moments(c.weight).known and "erfinv_" in log.moments(c.weight).op
    assert not log.moments(d).known and "no recorded init" in log.moments(d).op


def test_recording_leaves_torch_as_it_was():
    before = (torch.Tensor.normal_, torch.Tensor.__dict__.get("data"), nn.init.trunc_normal_,
              nn.init.orthogonal_)
    with initlog.recording():
        assert torch.Tensor.normal_ is not before[0]
    after = (torch.Tensor.normal_, torch.Tensor.__dict__.get("data"), nn.init.trunc_normal_,
             nn.init.orthogonal_)
    assert after == before
    with pytest.raises(RuntimeError), initlog.recording():  # a build that raises
        raise RuntimeError("the model's constructor failed")
    assert (torch.Tensor.normal_, torch.Tensor.__dict__.get("data"), nn.init.trunc_normal_,
            nn.init.orthogonal_) == before
    w = torch.empty(3, 3)
    nn.init.trunc_normal_(w)  # the real function again: values drawn
    assert w.abs().max() <= 2


# --- whole models: predict on meta against the model built for real ----------------

NANOGPT = '''
import math
import torch
from torch import nn
from torch.nn import functional as F

N_LAYER, N_EMBD, N_HEAD, VOCAB, BLOCK = 4, 256, 4, 512, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD)
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD)
        self.ln_2 = nn.LayerNorm(N_EMBD)
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD)
        self.gelu = nn.GELU()
        self.mlp_c_proj = nn.Linear(4 * N_EMBD, N_EMBD)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, N_EMBD)
        self.wpe = nn.Embedding(BLOCK, N_EMBD)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


model = GPT
example_input = lambda batch: torch.randint(0, VOCAB, (batch, BLOCK))
'''

TRUNC = '''
import torch
from torch import nn


def build_model():
    layers = []
    for i in range(6):
        linear = nn.Linear(256, 256)
        nn.init.trunc_normal_(linear.weight, std=0.02 if i < 5 else 1.0, a=-2.0, b=2.0)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)
'''

HF = '''
import transformers as tf
tf.logging.set_verbosity_error()
model = lambda: tf.{cls}(tf.{cfg}({kw}, vocab_size=100))
'''
HF_MODELS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             "n_layer=2, n_embd=64, n_head=2, n_positions=16, bos_token_id=1, eos_token_id=2"),
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              "num_hidden_layers=2, hidden_size=64, num_attention_heads=2, "
              "num_key_value_heads=1, intermediate_size=128, max_position_embeddings=16"),
    "bert": ("BertModel", "BertConfig",
             "num_hidden_layers=2, hidden_size=64, num_attention_heads=2, "
             "intermediate_size=128, max_position_embeddings=16"),
}
# Without a cache (a training setup) transformers checks the position ids for packed
# sequences with a branch on their values (``(mask[:, -1] == 0).all()``): on meta they
# come from torch.arange and carry their values (varprobe.metavalues).
HF_MODELS |= {
    f"{name}-no-cache{'-eager' if eager else ''}": (
        cls, cfg, kw + ", use_cache=False" + (", attn_implementation='eager'" if eager else ""))
    for name, (cls, cfg, kw) in list(HF_MODELS.items()) if name != "bert"
    for eager in (False, True)
}


def _meta_against_real(path: str) -> None:
    """Every weight layer's E[w^2] on meta is the real build's within 6 sd, and so is
    every prediction both make: a prediction is a product of per-layer factors n E[w^2]
    (sums of such products at residual adds, weighted averages of the factors' errors),
    so its relative error is at most the root-sum-square of the layers' sampling errors,
    sqrt(sum 2/N_l), whose 6 sd is the bound. The real build's weights' sums (G, which
    predict reads on a model with values) are left unread here: the meta build has
    none, and their sampling (a chi-square of the layer's outputs) is not the init's."""
    meta = predict_target(path, batch_size=4, compare="all")
    with mock.patch.object(mean_gain, "measure", lambda *args: None):
        real = predict_target(path, batch_size=4, device="cpu", compare="all")
    assert meta.settings["device"] == "meta" and real.settings["device"] == "cpu"
    assert not any("nothing recorded" in note for note in meta.notes), meta.notes
    model = target.load(path, device="meta").model
    numel = {name: w.numel() for name, m in model.named_modules()
             if (w := main_weight(m)[0]) is not None}
    sizes = []
    for a, b in zip(meta.layers, real.layers):
        if a.kind != "weight":
            continue
        n = numel[a.name]
        sizes.append(n)
        assert a.weight_second_moment == pytest.approx(b.weight_second_moment, rel=tol(n)), a.label
    bound = SD * math.sqrt(sum(2 / n for n in sizes))
    compared = 0
    for a, b in zip(meta.layers, real.layers):
        for pa, pb in ((a.predicted, b.predicted), *((a.schemes.get(s), b.schemes.get(s))
                                                     for s in a.schemes)):
            for key in ("forward_var", "backward_var"):
                x, y = getattr(pa, key, None), getattr(pb, key, None)
                assert (x is None) == (y is None), (a.label, key)
                if x is not None:
                    compared += 1
                    assert x == pytest.approx(y, rel=bound), (a.label, key)
    assert compared >= 10


def test_nanogpt_std_002_and_scaled_projections(tmp_path):
    path = tmp_path / "nanogpt.py"
    path.write_text(NANOGPT)
    report = predict_target(str(path), batch_size=4)
    by_name = {layer.label: layer for layer in report.layers}
    assert by_name["h.0.c_fc"].weight_second_moment == pytest.approx(0.02**2)
    assert by_name["h.3.c_proj"].weight_second_moment == pytest.approx(0.02**2 / 8)
    assert by_name["wte"].weight_second_moment == pytest.approx(0.02**2)  # tied, not N(0, 1)
    assert by_name["h.0.c_fc"].bias_second_moment == 0.0
    _meta_against_real(str(path))


def test_trunc_normal_model(tmp_path):
    path = tmp_path / "trunc.py"
    path.write_text(TRUNC)
    report = predict_target(str(path), batch_size=4)
    w2 = [layer.weight_second_moment for layer in report.layers if layer.kind == "weight"]
    assert w2[0] == pytest.approx(0.02**2, rel=1e-12)
    assert w2[-1] == pytest.approx(0.77374, abs=1e-5)  # truncated at +-2 sd
    _meta_against_real(str(path))


@pytest.mark.parametrize("name", HF_MODELS)
def test_transformers_init_weights(tmp_path, name):
    pytest.importorskip("transformers")
    cls, cfg, kw = HF_MODELS[name]
    path = tmp_path / f"{name}.py"
    path.write_text(HF.format(cls=cls, cfg=cfg, kw=kw))
    report = predict_target(str(path), batch_size=4)
    embedding = next(layer for layer in report.layers if layer.type == "Embedding")
    # _init_weights' N(0, 0.02^2), not nn.Embedding's N(0, 1); BERT's padding row
    # (pad_token_id 0) is zeroed: 1 row of the 100.
    kept = 0.99 if name.startswith("bert") else 1.0
    assert embedding.weight_second_moment == pytest.approx(kept * 0.02**2)
    _meta_against_real(str(path))


CONSTANTS = '''
from torch import nn


def build_model():
    m = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.PReLU(),
                      nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 256))
    nn.init.constant_(m[1].weight, 0.5)
    nn.init.constant_(m[1].bias, 0.1)
    nn.init.constant_(m[2].weight, 0.3)
    nn.init.constant_(m[4].weight, 2.0)
    return m
'''


def test_norm_scales_and_prelu_slopes_set_by_a_constant(tmp_path):
    path = tmp_path / "constants.py"
    path.write_text(CONSTANTS)
    report = predict_target(str(path), batch_size=4)
    bn, ln = report.layers[1], report.layers[4]
    assert bn.predicted.forward_var == pytest.approx(0.5**2 + 0.1**2, rel=1e-4)  # eps
    assert report.layers[3].input_gain == pytest.approx((1 + 0.3**2) / 2)
    assert ln.predicted.forward_var == pytest.approx(2.0**2, rel=1e-4)
    _meta_against_real(str(path))


def test_a_model_already_on_meta_takes_the_defaults_and_says_so():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    report = predict(model, input_shape=(16,), batch_size=4)
    assert any("PyTorch default init" in note and "not seen" in note for note in report.notes)
    assert all(layer.weight_var is None and "meta" in layer.unavailable["weight_var"]
               for layer in report.layers if layer.kind == "weight")


def test_an_init_with_no_closed_form_is_not_predicted(tmp_path):
    path = tmp_path / "opaque.py"
    path.write_text("import torch\nfrom torch import nn\n"
                    "def build_model():\n"
                    "    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))\n"
                    "    with torch.no_grad():\n"
                    "        m[2].weight.clamp_(-0.1, 0.1)\n"
                    "    return m\n")
    report = predict_target(str(path), batch_size=4)
    first, last = [layer for layer in report.layers if layer.kind == "weight"]
    assert first.weight_second_moment == pytest.approx(1 / 24)  # kaiming_uniform_(a=sqrt 5)
    assert last.weight_second_moment is None and "clamp_" in last.unavailable["weight_var"]
    assert last.predicted is None or last.predicted.forward_var is None


KURTOSIS = ("normal", "uniform", "kaiming_normal fan_out", "kaiming_uniform (default)",
            "xavier_uniform", "constant", ".data scaled")


@pytest.mark.parametrize("name", KURTOSIS)
def test_recorded_kurtosis_equals_a_real_draw(name):
    """E[w^4]/E[w^2]^2 (theory.chanspread's spread of a channel's sum of squares): 3 for
    a Gaussian, 9/5 for a symmetric uniform, 1 for a constant. Bound: 6 sd of the
    Gaussian's mean(w^4) (relative sqrt(96/n)/3) and twice mean(w^2)'s."""
    torch.manual_seed(0)
    real = _build("cpu", INITS[name]).weight.detach().double()
    with initlog.recording() as log:
        meta = _build("meta", INITS[name])
    got = log.moments(meta.weight)
    n = real.numel()
    want = (real.pow(4).mean() / real.pow(2).mean() ** 2).item()
    assert got.kurt == pytest.approx(want, rel=SD * (math.sqrt(96 / n) / 3 + 2 * math.sqrt(2 / n)))
