"""Sequence and attention networks as people write them by hand in plain PyTorch.

nanoGPT (Karpathy's model.py: its own LayerNorm calling ``F.layer_norm``, normal(0, 0.02)
init with every ``c_proj`` at 0.02/sqrt(2 n_layer), causal scaled-dot-product attention,
the LM head tied to the token embedding), the word-level LSTM language model of PyTorch's
examples (embedding, 2-layer LSTM, tied decoder, uniform(-0.1, 0.1) init), and a ViT
built on ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``-style pre-LN blocks;
and a character MLP fed one-hot rows, whose first Linear is an embedding table (N(0, 1),
nn.Embedding's init) in the form a one-hot input takes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from corpus import Entry, register

VOCAB, SEQ = 2000, 64


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: F.layer_norm with an optional bias."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(d), CausalSelfAttention(d, heads)
        self.ln_2, self.mlp = LayerNorm(d), MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, block: int = 2 * SEQ, layers: int = 6,
                 d: int = 128, heads: int = 4):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block, d),
            h=nn.ModuleList(Block(d, heads) for _ in range(layers)), ln_f=LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: the stream sums 2 n_layer of them
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class LSTMLanguageModel(nn.Module):
    """pytorch/examples word_language_model: RNNModel('LSTM', tie_weights=True)."""

    def __init__(self, vocab: int = VOCAB, d: int = 200, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, layers, dropout=dropout, batch_first=True)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.drop(self.encoder(idx)))
        return self.decoder(self.drop(out))


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A ViT as tutorials write it: conv patchify, [CLS] token, learned positions."""

    def __init__(self, image: int = 32, patch: int = 4, d: int = 128, layers: int = 6,
                 heads: int = 4, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(d, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ))


register(Entry(name="nanogpt", family="nanoGPT", make=NanoGPT, inputs=tokens, task="lm",
               vocab=VOCAB, notes="6 layers, width 128, 4 heads, tied head, scaled c_proj",
               tags=("transformer", "decoder", "token-input")))
register(Entry(name="lstm_lm", family="hand-written", make=LSTMLanguageModel, inputs=tokens,
               task="lm", vocab=VOCAB,
               notes="embedding 200, 2-layer LSTM (PyTorch's default uniform init), dropout "
                     "0.2, tied decoder",
               tags=("rnn", "token-input")))
register(Entry(name="vit_mha", family="hand-written", make=ViT,
               inputs=lambda batch: torch.randn(batch, 3, 32, 32), task="classify",
               notes="6 pre-LN blocks on nn.MultiheadAttention, PyTorch default inits",
               tags=("transformer", "vision")))


CHARS = 70  # Zhang et al. 2015's alphabet


class OneHotMLP(nn.Module):
    """A bag of one-hot characters (batch, CHARS) into a table at N(0, 1), then He ReLU
    layers and a head at 1/sqrt(width)."""

    def __init__(self, width: int = 256, depth: int = 4, classes: int = 4):
        super().__init__()
        self.table = nn.Linear(CHARS, width, bias=False)
        nn.init.normal_(self.table.weight)
        self.body = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        for m in self.body:
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
        self.head = nn.Linear(width, classes)
        nn.init.normal_(self.head.weight, std=width ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.table(x)
        for m in self.body:
            x = F.relu(m(x))
        return self.head(x)


def one_hot_chars(batch: int) -> torch.Tensor:
    return F.one_hot(torch.randint(0, CHARS, (batch,)), CHARS).float()


register(Entry(name="onehot_mlp", family="hand-written", make=OneHotMLP, inputs=one_hot_chars,
               task="classify", notes="one-hot characters into an N(0, 1) table, 4 He layers",
               tags=("one-hot",)))
