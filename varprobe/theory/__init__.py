"""The theory engine: closed-form predictions over the recorded dataflow.

One job per module, in the order the data takes:

- ``layer_fans``: module kinds, fans (nominal, torch's, effective) and each init scheme's
    weight and bias variances.
- ``gains``: activation gains E[f(y)^2]/q and E[f'(y)^2], closed form or quadrature.
- ``recording``: the dataflow of the forward pass, recorded as it runs.
- ``rules``: one op's forward (second moment, shared mean) and backward step.
- ``norms``: the normalization layers' steps (train, eval with running statistics).
- ``attention``, ``correlation``: attention at init and token correlation.
- ``weights``: E[w^2] and mean(b^2) per layer, for the actual init or a scheme.
- ``walk``: the walk over the recorded graph, forward then backward.
- ``annotate``: the report's predictions: local, the actual init's, and each scheme's
    when asked (``Counterfactuals``).

The names below are the ones the rest of varprobe uses.
"""

from varprobe.theory.annotate import annotate, end_to_end
from varprobe.theory.gains import (
    Gain,
    Values,
    backward_gain,
    elements,
    expectation,
    forward_gain,
    gain_unavailable_reason,
    live_at_zero,
    prelu_slope,
    rectified_moments,
)
from varprobe.theory.layer_fans import (
    NORMS,
    SCHEMES,
    Fans,
    effective_fans,
    fans,
    is_activation,
    is_linear_map,
    kind,
    own_parameters,
    param_fans,
    scheme_bias_variance,
    scheme_variance,
    tap_fraction,
    torch_fans,
)

__all__ = ["NORMS", "SCHEMES", "Fans", "Gain", "Values", "annotate", "backward_gain",
           "effective_fans", "elements", "end_to_end", "expectation", "fans", "forward_gain",
           "gain_unavailable_reason", "is_activation", "is_linear_map", "kind", "live_at_zero",
           "own_parameters", "param_fans", "prelu_slope", "rectified_moments",
           "scheme_bias_variance", "scheme_variance", "tap_fraction", "torch_fans"]
