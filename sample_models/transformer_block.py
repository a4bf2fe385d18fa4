"""A token embedding, two pre-LayerNorm transformer blocks and an LM head tied to it.

The input is integer token ids (varprobe draws them inside the vocabulary). Residual
adds and LayerNorms are followed by the graph prediction; attention has no closed form,
so varprobe carries its measured output past it. The story is the tied head: it shares
nn.Embedding's weight, which PyTorch draws from N(0, 1) — right for a lookup, but as a
Linear it multiplies E[x²] by n·Var[w] = 128, and varprobe flags exploding_forward there.
"""

import torch
from torch import nn

VOCAB, DIM, HEADS, DEPTH, SEQ = 1000, 128, 4, 2, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.blocks(self.embed(ids) + self.pos)))


model = TinyLM()
