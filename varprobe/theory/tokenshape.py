"""The tokens' shapes a walk reads: measured, or in closed form.

Two walks see a model's tokens differently. The actual init's walk over a measured pass
takes their shapes from the measurement: each LayerNorm's and RMSNorm's kappa (each
token's own scale against its gradient, theory.tokennorm) and each concatenation's
pieces' shares of its gradient (theory.catshare). The walks with nothing measured about
the tokens (a scheme's, which re-draws the weights that set those shapes, and
``varprobe predict`` on meta) carry them in closed form instead: a class token's own
value next to the mean (theory.positions), the directions the tokens span
(theory.widths), and a learned position table's part that no two tokens share. A walk
uses one of the two, never both (``closed_tokens``).
"""

from __future__ import annotations

from varprobe.theory import catshare, positions, tokennorm, widths
from varprobe.theory.nodes import Node
from varprobe.theory.signal import Signal, Value


class TokenShapes:
    """Mixed into theory.walk.Walk (its graph, constants, calls and modes)."""

    def token_gain(self, node: Node) -> float | None:
        """A feature norm's kappa (theory.tokennorm), for the actual init's walk (a
        scheme re-draws the weights that set the tokens' scales and gradients); None on
        meta, or where no gradient reached the norm's output."""
        index = getattr(self.graph, "token_norms", {}).get(node.index)
        if index is None or not self.measured or self.actual is not None:
            return None
        return tokennorm.gain(self.constants[index])

    @property
    def closed_tokens(self) -> bool:
        """Whether the walk models the tokens' shapes in closed form (a class token's
        own value, the tokens' width: theory.positions, theory.widths): every walk but
        the actual init's over a measured pass, which measures them (theory.tokennorm's
        kappa, theory.catshare's shares)."""
        return not (self.measured and self.actual is None)

    def cat_shares(self, k: int, node: Node) -> list[float] | None:
        """Concatenation ``k``'s pieces' shares of its gradient (theory.catshare), for
        the actual init's walk (as tokennorm's kappa); None elsewhere."""
        index = getattr(self.graph, "cat_shares", {}).get(k) \
            if node.cat and self.measured and self.actual is None else None
        return catshare.shares(self.constants, index, len(node.inputs))

    def _own(self, node: Node) -> float:
        """The constants with their own value at each position (learned positions):
        no part that tokens share, they add to E[x²], not to the token correlation r
        (nor to the mean of a unit over the positions a norm averages); none where
        the tokens' shapes are measured (closed_tokens)."""
        if not self.closed_tokens:
            return 0.0
        return sum(f * self.constants[c][0] for (f, c, _), mine in zip(node.const, node.own)
                   if mine)

    def token_shapes(self, node: Node, ins: list[Value], signal: Signal) -> Signal:
        """A linear node's output with the class token's own value and the tokens'
        width, in the walks that model them in closed form."""
        if not self.closed_tokens:
            return signal
        scale = 1.0 if node.scale is None else self.constants[node.scale][0]
        signal = positions.through_linear(node, [v.signal for v in ins], signal,
                                          self.constants, scale)
        return widths.mix([(f, v.signal) for f, v in zip(node.forward, ins)],
                          self._own(node), signal)

    def width(self, node: Node) -> int | None:
        """The fan-in of the layer that made the queries: the width n of attention's
        finite-width terms; None where there is none."""
        k = self._made_by(node.inputs[0])
        layer = self.report.layers[self.nodes[k].index] if k is not None else None
        if layer is None or layer.kind != "weight":
            return None
        source = self.calls.get(layer.index)
        return widths.effective(layer.fan_in, source.input.signal if source is not None
                                and source.input is not None else None)
