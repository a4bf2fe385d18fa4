"""An embedding lookup's token correlation from its ids (theory.tokenids)."""

from __future__ import annotations

import math

import pytest
import torch

from varprobe.predict import predict_target
from varprobe.theory.tokenids import same_id


def brute_force(ids: torch.Tensor) -> float:
    """The share of ordered pairs of distinct positions with equal ids, per sequence."""
    rows = ids.reshape(-1, ids.shape[-1]).tolist()
    shares = [sum(a == b for i, a in enumerate(r) for j, b in enumerate(r) if i != j)
              / (len(r) * (len(r) - 1)) for r in rows]
    return sum(shares) / len(shares)


@pytest.mark.parametrize("ids", [
    torch.zeros(3, 7, dtype=torch.long),                    # one id everywhere: 1
    torch.arange(9).expand(2, 9),                           # positions: 0
    torch.tensor([[1, 1, 2, 3], [4, 4, 4, 0]]),
    torch.randint(0, 5, (4, 2, 11), generator=torch.Generator().manual_seed(0)),
])
def test_same_id_counts_the_pairs(ids):
    assert same_id(ids).item() == pytest.approx(brute_force(ids), abs=1e-12)


BERT = '''
import transformers as tf
tf.logging.set_verbosity_error()
model = lambda: tf.BertModel(tf.BertConfig(
    num_hidden_layers=2, hidden_size=256, num_attention_heads=4, intermediate_size=512,
    vocab_size=512, max_position_embeddings=64))
'''
SEEDS, BATCH, SEQ = 4, 8, 32


def measured_attention_output(path) -> float:
    """E[y^2] of the first layer's attention.output.dense, by a plain forward hook on the
    model built for real, averaged over SEEDS inits (token types not given: all 0)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bert_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    total = 0.0
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        model = module.model().train()
        seen: list[float] = []
        hook = model.encoder.layer[0].attention.output.dense.register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(o.double().pow(2).mean().item()))
        ids = torch.randint(4, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            model(input_ids=ids)
        hook.remove()
        total += seen[0] / SEEDS
    return total


def test_bert_token_types_make_its_attention_values_alike_on_meta(tmp_path):
    """BERT adds the one token-type row (ids all 0) to every token: a third of the
    embeddings' sum is shared, so each attention output keeps a third of its values'
    scale (r = 1/3) where r = 0 would leave ~P2 = 1/T of it, 1/10 as much here.
    The bound: the shared row is one draw of 256 features, its squared norm off by
    sqrt(2/256) = 9% per init, 4.4% over 4 inits; the bound is 4 sd of that, 0.18.
    The first layer only: deeper ones add what the walk's r through a block misses."""
    pytest.importorskip("transformers")
    path = tmp_path / "bert.py"
    path.write_text(BERT)
    report = predict_target(str(path), batch_size=BATCH, input_shape=(SEQ,))
    assert report.settings["device"] == "meta"
    predicted = next(layer.predicted.forward_var for layer in report.layers
                     if layer.name == "encoder.layer.0.attention.output.dense")
    measured = measured_attention_output(path)
    bound = 4 * math.sqrt(2 / 256) / math.sqrt(SEEDS)
    assert abs(math.log(predicted / measured)) < bound, (predicted, measured)
