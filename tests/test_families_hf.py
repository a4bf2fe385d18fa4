"""HuggingFace transformers built from tiny configs (no download): GPT-2, BERT, a
Llama-style decoder, T5. Keyword inputs, ModelOutput outputs, tied embeddings,
synthesized token ids. Skipped when transformers is not installed (the `hf` extra).
"""

from __future__ import annotations

import math

import pytest
import torch
from pristine import assert_untouched, give_grads, snapshot
from reference import assert_matches, capture
from schema import check_report

import varprobe
from varprobe import inputs
from varprobe.predict import predict_target
from varprobe.recorder import float_leaves

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

BATCH, SEQ, VOCAB = 4, 8, 100


def gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                            n_positions=16, bos_token_id=1, eos_token_id=2))


def bert():
    return tf.BertModel(tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=16))


def llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16))


def t5():
    return tf.T5ForConditionalGeneration(tf.T5Config(
        num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16,
        vocab_size=VOCAB))


MODELS = {
    # name: (builder, layers checked against the reference)
    "gpt2": (gpt2, ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj",
                    "transformer.ln_f", "lm_head"]),
    "bert": (bert, ["embeddings.LayerNorm", "encoder.layer.0.attention.self.query",
                    "encoder.layer.1.output.dense", "pooler.dense"]),
    "llama": (llama, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                      "model.norm", "lm_head"]),
    "t5": (t5, ["encoder.block.0.layer.0.SelfAttention.q", "encoder.final_layer_norm",
                "decoder.block.1.layer.2.DenseReluDense.wo", "lm_head"]),
}


def weight_layer_names(model) -> set[str]:
    """Every module that multiplies by a matrix: nn.Linear and GPT-2's Conv1D."""
    return {n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, tf.pytorch_utils.Conv1D))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_synthesized_inputs_run_and_every_weight_layer_is_measured(name):
    torch.manual_seed(0)
    model = MODELS[name][0]()
    give_grads(model)
    before = snapshot(model)
    report = varprobe.probe(model, batch_size=BATCH, input_shape=(SEQ,))
    assert_untouched(model, before)
    check_report(report.to_dict())
    assert report.input.shape["input_ids"] == [BATCH, SEQ]
    recorded = {layer.name for layer in report.weight_layers}
    assert weight_layer_names(model) <= recorded
    for layer in report.weight_layers:
        if layer.name in weight_layer_names(model):
            assert math.isfinite(layer.forward.var) and layer.forward.var > 0, layer.label
            if layer.backward is None:
                # The default cotangent sits on the first output (last_hidden_state);
                # BERT's pooler only feeds pooler_output, so no gradient reaches it.
                assert layer.name.startswith("pooler"), layer.label
                assert "no gradient" in layer.unavailable["backward"]
                continue
            assert math.isfinite(layer.backward.var) and layer.backward.var > 0, layer.label


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recorded_stats_equal_plain_autograd(name):
    build, checked = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = inputs.transformers_inputs(model, BATCH, (SEQ,), torch.Generator().manual_seed(1))
    with torch.no_grad():
        cotangents = [torch.randn(t.shape) for t in float_leaves(model(**x))]
    report = varprobe.probe(model, x, grad_output=cotangents)
    assert assert_matches(report, capture(model, x, cotangents, checked)) == len(checked)


def test_token_ids_stay_inside_the_vocabulary_and_skip_padding():
    model = bert()  # pad_token_id 0
    fed = inputs.transformers_inputs(model, 64, (SEQ,), torch.Generator().manual_seed(0))
    ids = fed["input_ids"]
    assert ids.shape == (64, SEQ) and ids.dtype == torch.long
    assert int(ids.min()) >= 1 and int(ids.max()) <= VOCAB - 1
    assert len(ids.unique()) > VOCAB // 2  # spread over the vocabulary, not one token


def test_sequence_length_defaults_within_the_position_limit():
    fed = inputs.transformers_inputs(gpt2(), 2, None, torch.Generator().manual_seed(0))
    assert fed["input_ids"].shape == (2, 16)  # n_positions = 16 < the default 32


def test_t5_gets_decoder_inputs_too():
    fed = inputs.transformers_inputs(t5(), BATCH, (SEQ,), torch.Generator().manual_seed(0))
    assert set(fed) == {"input_ids", "decoder_input_ids"}  # no mask: every position attends
    assert fed["decoder_input_ids"].shape == (BATCH, SEQ)


def test_tied_embeddings_are_recorded_once_per_call():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    report = varprobe.probe(model, batch_size=BATCH, input_shape=(SEQ,))
    labels = [layer.label for layer in report.layers]
    assert labels.count("transformer.wte") == 1 and labels.count("lm_head") == 1
    wte, head = (next(x for x in report.layers if x.name == n)
                 for n in ("transformer.wte", "lm_head"))
    assert wte.weight_var == head.weight_var  # one tensor, seen from both ends
    assert wte.shape == [BATCH, SEQ, 32]
    assert head.weight_grad_ratio > 0 and wte.weight_grad_ratio == head.weight_grad_ratio


def test_t5_shared_embedding_is_one_weight_in_two_modules():
    model = t5()
    report = varprobe.probe(model, batch_size=BATCH, input_shape=(SEQ,))
    embeds = [x for x in report.layers if x.name.endswith("embed_tokens")]
    assert [x.name for x in embeds] == ["encoder.embed_tokens", "decoder.embed_tokens"]
    assert embeds[0].weight_var == embeds[1].weight_var
    assert all(x.backward is not None for x in embeds)


TRAINING_BUILD = '''
import transformers as tf
tf.logging.set_verbosity_error()
model = lambda: tf.{cls}(tf.{cfg}({kw}, vocab_size=100, use_cache=False,
                                  attn_implementation="{attn}"))
'''
TRAINING = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             "n_layer=2, n_embd=32, n_head=2, n_positions=16, bos_token_id=1, eos_token_id=2"),
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              "num_hidden_layers=2, hidden_size=32, num_attention_heads=2, "
              "num_key_value_heads=1, intermediate_size=64, max_position_embeddings=16"),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(TRAINING))
def test_predict_builds_gpt2_and_llama_without_a_cache_on_meta(tmp_path, name, attn):
    # Without a cache transformers branches on the position ids' values (its check for
    # packed sequences); on meta they carry their values (varprobe.metavalues), so the
    # model is built and run there, its _init_weights recorded for every weight layer
    # (exact moments of the draws it makes: no sampling).
    cls, cfg, kw = TRAINING[name]
    path = tmp_path / f"{name}_{attn}.py"
    path.write_text(TRAINING_BUILD.format(cls=cls, cfg=cfg, kw=kw, attn=attn))
    report = predict_target(str(path), batch_size=BATCH, input_shape=(SEQ,))
    assert report.settings["device"] == "meta"
    weights = report.weight_layers
    assert report.notes[0] == ("weights: the moments the model's own init ops give "
                               "(recorded while it was built on the meta device) for "
                               f"{len(weights)} weight layer(s)")
    for layer in weights:
        # initializer_range 0.02; GPT-2 scales its residual projections by 1/sqrt(2 n_layer)
        scaled = name == "gpt2" and layer.name.endswith("c_proj")
        want = 0.02**2 / (2 * 2) if scaled else 0.02**2
        assert layer.weight_second_moment == pytest.approx(want), layer.label
        assert layer.predicted.forward_var is not None, layer.label
        assert layer.predicted.backward_var is not None, layer.label
