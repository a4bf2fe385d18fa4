"""Language models from HuggingFace transformers' own code, at tiny configs.

Each model is built from its config class (no hub download); the constructor's
``post_init`` runs the library's ``_init_weights``, so the weights are the ones the
library trains from (normal(0, initializer_range) for most, T5's d_model-scaled
normals, ...). Depth is real where it is cheap: 4 blocks, hidden 128, vocabulary 2000,
sequences of 64 tokens. The KV cache is off: a training forward pass keeps none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tf

from corpus import Entry, register
from corpus.broken import pair

tf.logging.set_verbosity_error()

VOCAB, SEQ, WIDTH, LAYERS, HEADS = 2000, 64, 128, 4, 4


def tokens(batch: int, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    """Token ids spread over the vocabulary, skipping the low ids specials sit on."""
    return torch.randint(4, vocab, (batch, seq))


def ids(batch: int) -> dict[str, torch.Tensor]:
    return {"input_ids": tokens(batch)}


def seq2seq_ids(batch: int) -> dict[str, torch.Tensor]:
    """Decoder ids as long as the encoder's: as an "lm" entry, decoder position t is
    trained to name encoder token t + 1, a copy through cross-attention."""
    return {"input_ids": tokens(batch), "decoder_input_ids": tokens(batch)}


def model(cls: str, config: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    """A builder: ``tf.<cls>(tf.<config>(**kwargs))``, the cache off."""
    def make() -> torch.nn.Module:
        return getattr(tf, cls)(getattr(tf, config)(use_cache=False, **kwargs))
    return make


def lm(name: str, cls: str, config: str, notes: str, **kwargs: Any) -> Entry:
    return register(Entry(name=name, family="transformers", make=model(cls, config, **kwargs),
                          inputs=ids, task="lm", vocab=VOCAB, notes=notes,
                          tags=("transformer", "decoder", "token-input")))


DECODER = dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS,
               vocab_size=VOCAB, max_position_embeddings=2 * SEQ)

lm("hf_gpt2", "GPT2LMHeadModel", "GPT2Config",
   "GPT-2: pre-LN, GELU MLP, Conv1D projections, c_proj scaled by 1/sqrt(2 n_layer), "
   "tied LM head",
   n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, n_positions=2 * SEQ)
lm("hf_llama", "LlamaForCausalLM", "LlamaConfig",
   "Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied head",
   **DECODER, num_key_value_heads=2, intermediate_size=344)
lm("hf_mistral", "MistralForCausalLM", "MistralConfig",
   "Mistral: Llama layout with sliding-window attention (window 32 < sequence)",
   **DECODER, num_key_value_heads=2, intermediate_size=344, sliding_window=32)
lm("hf_qwen2", "Qwen2ForCausalLM", "Qwen2Config",
   "Qwen2: Llama layout with q/k/v biases",
   **DECODER, num_key_value_heads=2, intermediate_size=344)
lm("hf_olmo2", "Olmo2ForCausalLM", "Olmo2Config",
   "OLMo 2: norms after attention and MLP (post-norm inside the residual), RMSNorm on the "
   "whole q and k projections (QK-norm), RoPE",
   **DECODER, num_key_value_heads=2, intermediate_size=344)
lm("hf_mixtral", "MixtralForCausalLM", "MixtralConfig",
   "Mixtral: Llama layout with a sparse mixture of experts (4 SwiGLU experts, top-2 "
   "router) in place of the MLP",
   **DECODER, num_key_value_heads=2, intermediate_size=344, num_local_experts=4,
   num_experts_per_tok=2)
lm("hf_gemma", "GemmaForCausalLM", "GemmaConfig",
   "Gemma: embeddings scaled by sqrt(hidden), (1 + w) RMSNorm, GeGLU, tied head",
   **DECODER, num_key_value_heads=1, head_dim=32, intermediate_size=344)
lm("hf_gemma3n", "Gemma3nForCausalLM", "Gemma3nTextConfig",
   "Gemma 3n: AltUp (4 streams in one tensor, the corrected one scaled by a learned "
   "gate at 0 into per-layer inputs added back in place), LAuReL, per-layer "
   "embeddings, Gaussian top-k activation sparsity in the first layers, tied head",
   **DECODER, num_key_value_heads=2, head_dim=32, intermediate_size=344,
   vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16, laurel_rank=8,
   layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
   num_kv_shared_layers=0, activation_sparsity_pattern=[0.95, 0.95] + [0.0] * (LAYERS - 2))
lm("hf_gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
   "GPT-NeoX (Pythia): parallel attention + MLP residual, partial rotary, untied head",
   **DECODER, intermediate_size=4 * WIDTH)
lm("hf_falcon", "FalconForCausalLM", "FalconConfig",
   "Falcon: parallel attention + MLP, multi-query attention, ALiBi off (rotary)",
   num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS,
   vocab_size=VOCAB, max_position_embeddings=2 * SEQ)
lm("hf_opt", "OPTForCausalLM", "OPTConfig",
   "OPT: pre-LN decoder, ReLU MLP, learned positions, tied head",
   num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS,
   ffn_dim=4 * WIDTH, word_embed_proj_dim=WIDTH, vocab_size=VOCAB,
   max_position_embeddings=2 * SEQ)
lm("hf_phi", "PhiForCausalLM", "PhiConfig",
   "Phi: parallel attention + MLP sharing one LayerNorm, partial rotary, untied head",
   **DECODER, intermediate_size=4 * WIDTH)
lm("hf_xlstm", "xLSTMForCausalLM", "xLSTMConfig",
   "xLSTM: mLSTM blocks and a SiLU-gated feed-forward whose gate projection starts at "
   "zero (every gate unit zero for every sample, yet learning: silu'(0) = 1/2)",
   num_hidden_layers=LAYERS, hidden_size=WIDTH, num_heads=HEADS, vocab_size=VOCAB)
lm("hf_mamba", "MambaForCausalLM", "MambaConfig",
   "Mamba: selective state-space blocks (the sequential CPU path), RMSNorm, tied head",
   num_hidden_layers=LAYERS, hidden_size=WIDTH, state_size=16, vocab_size=VOCAB)

register(Entry(
    name="hf_bert_mlm", family="transformers",
    make=model("BertForMaskedLM", "BertConfig", num_hidden_layers=LAYERS, hidden_size=WIDTH,
               num_attention_heads=HEADS, intermediate_size=4 * WIDTH, vocab_size=VOCAB,
               max_position_embeddings=2 * SEQ),
    inputs=ids, task="lm", vocab=VOCAB,
    notes="BERT masked LM: post-LN encoder, GELU, prediction head (dense, LN) tied to the "
          "embeddings; bidirectional, so next-token training is a copy task for it",
    tags=("transformer", "encoder", "token-input", "post-ln")))
register(Entry(
    name="hf_bert_classify", family="transformers",
    make=model("BertForSequenceClassification", "BertConfig", num_hidden_layers=LAYERS,
               hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
               vocab_size=VOCAB, max_position_embeddings=2 * SEQ, num_labels=10),
    inputs=ids, task="classify",
    notes="BERT with the pooler (tanh) and a 10-way classifier on [CLS]",
    tags=("transformer", "encoder", "token-input", "post-ln")))
register(Entry(
    name="hf_bart", family="transformers",
    make=model("BartForConditionalGeneration", "BartConfig", encoder_layers=LAYERS,
               decoder_layers=LAYERS, d_model=WIDTH, encoder_attention_heads=HEADS,
               decoder_attention_heads=HEADS, encoder_ffn_dim=4 * WIDTH,
               decoder_ffn_dim=4 * WIDTH, vocab_size=VOCAB, max_position_embeddings=2 * SEQ),
    inputs=seq2seq_ids, task="lm", vocab=VOCAB,
    notes="BART encoder-decoder: post-LN, learned positions, tied head with final_logits_bias",
    tags=("transformer", "encoder-decoder", "token-input", "post-ln")))
register(Entry(
    name="hf_t5", family="transformers",
    make=model("T5ForConditionalGeneration", "T5Config", num_layers=LAYERS,
               num_decoder_layers=LAYERS, d_model=WIDTH, d_ff=4 * WIDTH, num_heads=HEADS,
               d_kv=WIDTH // HEADS, vocab_size=VOCAB),
    inputs=seq2seq_ids, task="lm", vocab=VOCAB,
    notes="T5 v1.0: RMS-style norm without bias, relative position buckets, unscaled "
          "attention (folded into the init), tied head rescaled by d_model^-0.5",
    tags=("transformer", "encoder-decoder", "token-input")))


def _t5_v11(head_scaled: bool = False) -> torch.nn.Module:
    """T5 v1.1 as its config asks (gated GELU, ``tie_word_embeddings=False``): the library
    still ties the head to the N(0, 1) shared embedding but drops v1.0's d_model^-0.5
    before it. The twin: the head untied into a copy scaled by d_model^-0.5."""
    made = model("T5ForConditionalGeneration", "T5Config", num_layers=LAYERS,
                 num_decoder_layers=LAYERS, d_model=WIDTH, d_ff=4 * WIDTH, num_heads=HEADS,
                 d_kv=WIDTH // HEADS, vocab_size=VOCAB, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False)()
    if head_scaled:
        head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        with torch.no_grad():
            head.weight.copy_(made.shared.weight * WIDTH ** -0.5)
        made.lm_head = head
    return made


pair("hf_t5_v11", "transformers", _t5_v11, lambda: _t5_v11(True), seq2seq_ids,
     "hot logits: the LM head is the N(0, 1) embedding with no d_model^-0.5 before it, so "
     "the logits start at E[y²] ~ d_model", culprits=("lm_head",), batch_size=8,
     task="lm", vocab=VOCAB, notes="T5 v1.1 (gated GELU) as transformers builds it")


def _cpmant(qk_scaled: bool = False) -> torch.nn.Module:
    """CPM-Ant at its library init (``init_std=1.0``: every Linear drawn N(0, 1)) with its
    untied LM head scaled by d_model^-0.5, so that only the attention is broken: q and k
    at std 1 put the logits' variance at ~d_model and each query's weight on one key.
    The twin: the q and k projections drawn at std d_model^-0.5."""
    made = model("CpmAntForCausalLM", "CpmAntConfig", vocab_size=VOCAB, hidden_size=WIDTH,
                 num_attention_heads=HEADS, dim_head=WIDTH // HEADS, dim_ff=344,
                 num_hidden_layers=LAYERS, prompt_types=4, prompt_length=4,
                 segment_types=4)()
    with torch.no_grad():
        made.lm_head.weight.mul_(WIDTH ** -0.5)
        for name, module in made.named_modules():
            if qk_scaled and name.endswith(("project_q", "project_k")):
                torch.nn.init.normal_(module.weight, std=WIDTH ** -0.5)
    return made


pair("hf_cpmant", "transformers", _cpmant, lambda: _cpmant(True), ids,
     "collapsed attention: CPM-Ant's init_std = 1.0 draws q and k at N(0, 1), so the "
     "logits' variance is ~d_model and each query's weight sits on one key",
     culprits=("cpmant.encoder.layers.0.self_att.self_attention.project_q",), batch_size=8,
     task="lm", vocab=VOCAB,
     notes="CPM-Ant: eager attention with a relative position bias added to the logits and "
     "its masks filled from torch.scalar_tensor; the LM head scaled to leave the attention")
