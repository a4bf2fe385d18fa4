"""Input synthesis for every kind of transformers main input (token ids, pixel values,
audio features, raw audio; decoder ids for encoder-decoders), read off the model's own
declaration, and the probe's requires-grad input next to a model that sets
``requires_grad`` itself (Wav2Vec2). Tiny configs, built offline."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import varprobe
from tests.pristine import assert_untouched, snapshot
from varprobe import inputs
from varprobe.errors import VarprobeError

tf = pytest.importorskip("transformers")

BATCH = 2
SEQ = 8
ATTN = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
QUIET = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def vit(cls=None):
    return (cls or tf.ViTModel)(tf.ViTConfig(**ATTN, **QUIET, image_size=16, patch_size=8,
                                             num_channels=3, num_labels=3))


def wav2vec2():
    return tf.Wav2Vec2Model(tf.Wav2Vec2Config(
        **ATTN, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0))


def hubert():
    return tf.HubertModel(tf.HubertConfig(
        **ATTN, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2))


def speech2text():
    return tf.Speech2TextModel(tf.Speech2TextConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50,
        input_feat_per_channel=8, conv_channels=8, max_source_positions=64,
        max_target_positions=32))


def videomae():
    return tf.VideoMAEModel(tf.VideoMAEConfig(**ATTN, image_size=16, patch_size=8,
                                              num_frames=4, tubelet_size=2))


def ast():
    return tf.ASTModel(tf.ASTConfig(**ATTN, num_mel_bins=16, max_length=32, patch_size=8,
                                    frequency_stride=8, time_stride=8))


def whisper():
    return tf.WhisperModel(tf.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=4,
        max_source_positions=8, max_target_positions=16, vocab_size=50, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def t5():
    return tf.T5Model(tf.T5Config(num_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                                  vocab_size=50, decoder_start_token_id=0))


def bart():
    return tf.BartModel(tf.BartConfig(
        encoder_layers=1, decoder_layers=1, d_model=16, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50,
        max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2))


def gpt2():
    return tf.GPT2Model(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                      n_positions=16))


def bert():
    return tf.BertModel(tf.BertConfig(**ATTN, vocab_size=50, max_position_embeddings=16))


# name: (builder, the keyword inputs with their shapes, from each model's documented input)
EXPECTED = {
    "vit": (vit, {"pixel_values": (BATCH, 3, 16, 16)}),  # num_channels x image_size²
    "vit-classifier": (lambda: vit(tf.ViTForImageClassification),
                       {"pixel_values": (BATCH, 3, 16, 16)}),
    # Whisper's encoder takes exactly 2 x max_source_positions mel frames (its conv2
    # has stride 2), num_mel_bins features each; the decoder takes token ids.
    "whisper": (whisper, {"input_features": (BATCH, 4, 16), "decoder_input_ids": (BATCH, 16)}),
    "videomae": (videomae, {"pixel_values": (BATCH, 4, 3, 16, 16)}),  # num_frames first
    "ast": (ast, {"input_values": (BATCH, 32, 16)}),  # max_length x num_mel_bins
    "t5": (t5, {"input_ids": (BATCH, SEQ), "decoder_input_ids": (BATCH, SEQ)}),
    "bart": (bart, {"input_ids": (BATCH, SEQ), "decoder_input_ids": (BATCH, SEQ)}),
    "gpt2": (gpt2, {"input_ids": (BATCH, SEQ)}),
    "bert": (bert, {"input_ids": (BATCH, SEQ)}),
}


def synthesized(model, shape=None):
    return inputs.transformers_inputs(model, BATCH, shape, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inputs_follow_the_models_declaration(name):
    build, expected = EXPECTED[name]
    model = build()
    shape = (SEQ,) if "input_ids" in expected else None
    fed = synthesized(model, shape)
    assert {k: tuple(v.shape) for k, v in fed.items()} == expected
    for key, t in fed.items():
        assert t.is_floating_point() != key.endswith("_ids"), key


@pytest.mark.parametrize(("build", "key"), [(wav2vec2, "input_values"),
                                            (hubert, "input_values"),
                                            (speech2text, "input_features")])
def test_audio_lengths_give_the_encoder_32_frames(build, key):
    model = build()
    x = synthesized(model)[key]
    assert x.shape[0] == BATCH
    if key == "input_features":  # Speech2Text: (frames, input_feat_per_channel)
        assert x.shape[2] == model.config.input_feat_per_channel
    # The model's own arithmetic for its encoder's output length.
    assert int(model._get_feat_extract_output_lengths(torch.tensor(x.shape[1]))) == \
        inputs.DEFAULT_SEQUENCE


def test_float_inputs_are_unit_gaussians():
    x = synthesized(vit())["pixel_values"].double()
    n = x.numel()
    # The sample variance of n N(0, 1) draws has standard deviation sqrt(2 / n); mean
    # sqrt(1 / n). Five of them: a false failure has probability < 1e-6.
    assert abs(x.var(unbiased=False).item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(x.mean().item()) < 5 * math.sqrt(1 / n)


def test_input_shape_overrides_the_per_sample_shape():
    assert synthesized(vit(), (3, 8, 8))["pixel_values"].shape == (BATCH, 3, 8, 8)


def test_an_undeclared_float_input_is_one_clear_error():
    model = vit()
    model.main_input_name = "mystery_values"
    with pytest.raises(VarprobeError, match="cannot synthesize mystery_values.*--input-shape"):
        synthesized(model)


BUILDERS = {**{name: build for name, (build, _) in EXPECTED.items()}, "wav2vec2": wav2vec2,
            "hubert": hubert, "speech2text": speech2text}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_probe_runs_on_synthesized_inputs_and_measures_every_weight_layer(name, mode):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    report = varprobe.probe(model, batch_size=BATCH, mode=mode)
    weights = report.weight_layers
    assert weights
    unmeasured = [layer.label for layer in weights if layer.forward is None]
    assert not unmeasured


# --- the probe's requires-grad input and a model's own requires_grad -------------------

class SetsFlag(nn.Module):
    """Like Wav2Vec2's feature encoder: makes a view of its input (or the input itself)
    require grad."""

    def __init__(self, on_view: bool = True):
        super().__init__()
        self.conv, self.on_view = nn.Conv1d(1, 4, 3), on_view

    def forward(self, x):
        h = x[:, None] if self.on_view else x
        h.requires_grad = True
        return self.conv(h if self.on_view else h[:, None])


def plain_input_gradient(model: nn.Module, x: torch.Tensor, g: torch.Tensor,
                         layer: nn.Module) -> torch.Tensor:
    """d<model(x), g>/d(the layer's input), by plain autograd, in a plain call."""
    seen = []

    def keep(module, args):
        if not args[0].is_leaf:  # a leaf's .grad is kept anyway
            args[0].retain_grad()
        seen.append(args[0])

    handle = layer.register_forward_pre_hook(keep)
    try:
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.backward(g)
    finally:
        handle.remove()
    return seen[0].grad.double()


@pytest.mark.parametrize("on_view", [True, False])
def test_a_view_made_to_require_grad_is_measured_as_the_plain_call_sees_it(on_view):
    torch.manual_seed(0)
    model, x = SetsFlag(on_view), torch.randn(4, 16)
    g = torch.randn(4, 4, 14)
    expected = plain_input_gradient(model, x, g, model.conv)
    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    report = varprobe.probe(model, x, grad_output=g)
    assert_untouched(model, before)
    [conv] = [layer for layer in report.layers if layer.name == "conv"]
    # float32 reductions of the same tensor (tests/reference.py: 1e-5 relative).
    assert conv.backward_input.var == pytest.approx(expected.var(unbiased=False).item(),
                                                    rel=1e-5)


class SetsFlagOnComputed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h.requires_grad = True  # a non-leaf through a parameter: the plain call raises too
        return h


def test_a_set_the_plain_call_refuses_is_still_refused():
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="leaf"):
        SetsFlagOnComputed()(x)
    with pytest.raises(VarprobeError, match="leaf variables"):
        varprobe.probe(SetsFlagOnComputed(), x)


class CountsMask(nn.Module):
    """Like HunyuanVideo: counts a float mask's ones with an integer-dtype sum."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask):
        keep = mask.sum(dim=1, dtype=torch.int)
        return self.lin(x) * (keep[:, None] > 0)


def test_an_integer_reduction_of_a_float_input_runs_as_the_plain_call():
    x, mask = torch.randn(2, 4), torch.ones(2, 3)
    CountsMask()(x, mask)  # the plain call: the mask does not require grad
    report = varprobe.probe(CountsMask(), (x, mask))
    [lin] = [layer for layer in report.layers if layer.name == "lin"]
    assert lin.backward is not None and lin.backward.var > 0
    with pytest.raises(VarprobeError, match="Autograd not support dtype"):
        varprobe.probe(nn.Sequential(SumsTrainable()), x)


class SumsTrainable(nn.Module):
    """An integer sum of a tensor that requires grad through a parameter: refused by
    autograd in the plain call, and so under the probe."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * self.lin(x).sum(dim=1, dtype=torch.int)[:, None]


def test_wav2vec2_in_train_mode_measures_its_first_conv_input_gradient():
    torch.manual_seed(0)
    model = wav2vec2().train()
    x = synthesized(model)["input_values"]
    first = model.feature_extractor.conv_layers[0].conv
    with torch.no_grad():
        out = model(x).last_hidden_state
    g = torch.randn(out.shape)
    expected = plain_input_gradient(model, x, g, first)
    report = varprobe.probe(model, {"input_values": x}, mode="train",
                            grad_output=[g, torch.zeros(model(x).extract_features.shape)])
    [conv] = [layer for layer in report.layers
              if layer.name == "feature_extractor.conv_layers.0.conv"]
    assert conv.backward_input.var == pytest.approx(expected.var(unbiased=False).item(),
                                                    rel=1e-5)
