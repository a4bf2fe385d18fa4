"""Per-rule accuracy of varprobe's closed-form predictions: one module per rule family.

Each public module here (a name without a leading underscore) is one rule family and
exposes ``cases(seeds: int = 8) -> list[dict]``: one row per grid case,

    {"rule": str, "case": str, "forward_error": float | None, "backward_error": float | None}

where an error is the relative error |measured/predicted - 1|, with the measured value
averaged over ``seeds`` seeds (the seed draws the weights, the input and the cotangent;
each case has seeds of its own, so different cases' errors are independent draws)
and None where that direction does not apply or where varprobe made no prediction.
Rows may carry more keys; those the built-in families add (see ``_harness.Row``):
``status`` ("ok", "no prediction", "carried": the prediction is a measured value passed
on, not a rule), ``note`` (the prediction's note), ``forward_ratio``/``backward_ratio``
(mean measured/predicted), ``forward_se``/``backward_se`` (standard error of that mean
over the seeds), ``forward_bound``/``backward_bound`` (the noise bound from the theory,
docs/theory-review.md §10, for this case's width and seed count) and ``width``.

Every case is a tiny model with the op between two weight layers (Linear -> op ->
Linear, Conv -> op -> Conv), probed with ``varprobe.probe`` only; forward is measured
at the weight layer after the op (``forward.second_moment`` against
``predicted.forward_var``), backward at the weight layer before it (``backward.var``
against ``predicted.backward_var``). For a weight-layer op (linear, conv) both are
taken at the op itself (``forward`` and ``backward_input``).

``bench/theory_accuracy.py`` imports every module here and writes
docs/theory-accuracy.md; tests/test_theory_accuracy.py asserts a fast subset.
"""
