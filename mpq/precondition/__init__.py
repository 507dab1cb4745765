"""Preconditioning: equivalence transforms of the fp model that change what quantization destroys.

A :class:`PreconditionSpec` (frozen, JSON-able: ``{"method": ..., "params": {...}}``) names one of

- ``none``: the model as it is (a copy).
- ``scale_folding`` (RAMP's Scale Folding, in SmoothQuant's form): per input channel ``j`` of a
  group of layers sharing one input, ``s_j = max|X_j|^alpha / max_i |W_i[:, j]|^(1 - alpha)``
  (max over calibration tokens and over every row of every layer of the group), the layers'
  weights become ``W diag(s)`` and the op that produces ``X`` divides its output by ``s`` (a
  norm's weight, or the rows of the previous Linear). RAMP's abstract gives the idea (migrate
  activation outliers into the weights by per-channel scaling, compensated in the normalization
  layer) but not the formula; this is SmoothQuant's, which it names.
- ``awq`` (AWQ's activation-aware scales): per group, ``s = mean|X_j|^a`` normalised by
  ``sqrt(max s * min s)``, ``a`` on the grid ``k / n_grid`` (``k = 0..n_grid-1``), keeping the
  ``a`` that minimises the group's output error ``sum_i ||Q_i(W_i diag(s)) diag(1/s) X^T -
  W_i X^T||^2`` with ``Q_i`` the RTN format of layer ``i`` (the spec's ``fmt``, or a per-layer
  override taken from a plan: :meth:`PreconditionSpec.for_plan`). The error is computed exactly
  from the input Gram ``H = X^T X`` (``tr(dW H dW^T)``), so calibration is one forward pass.
  ``a = 0`` is the identity, so on calibration data AWQ never does worse than plain RTN.
  Differences from the AWQ reference code: the error is measured on the group's Linear
  outputs, not on the whole attention / MLP module's output; there is no weight-clipping search;
  GPTQ formats are searched with RTN at the same bits.

Where the scales fold is data (:class:`FoldRule`), for LLaMA-style decoder blocks
(LLaMA / Mistral / Qwen2 / SmolLM naming):

========  =============================  ==============================================
group     folds ``1/s`` into             scales the input columns of
========  =============================  ==============================================
attn_in   ``input_layernorm`` weight     ``q_proj, k_proj, v_proj`` (one vector)
attn_out  ``v_proj`` output rows (+bias)  ``o_proj`` (grouped-query attention: see below)
mlp_in    ``post_attention_layernorm``   ``gate_proj, up_proj`` (one vector)
mlp_out   ``up_proj`` output rows (+bias) ``down_proj`` (its input ``act(gate) * up`` is
                                         linear in ``up``)
head      final ``model.norm`` weight    ``lm_head``, only when its weight is not shared
========  =============================  ==============================================

Grouped-query attention: ``o_proj``'s input channel ``h * head_dim + d`` carries value channel
``(h // n_rep) * head_dim + d``, so the ``o_proj`` scale is one vector over the ``kv_heads *
head_dim`` value channels, repeated over the ``n_rep`` query heads that read each kv head
(statistics are reduced over those heads: max for scale folding, mean for AWQ).
Row scaling of ``v_proj`` / ``up_proj`` does not change their own per-channel or group-wise
quantization (every row has its own scales), up to the rounding of the scales.

Every quantizable layer the rules do not cover is listed in the :class:`FoldReport` as
``not folded: <reason>`` (embeddings, a tied ``lm_head``, layers that are not targets), never
skipped silently. ``pow2=True`` rounds every scale to a power of two: the transform is then
exact in floating point (bit-identical fp outputs), at a coarser scale grid.

The transform is pure: the input model is never changed; a transformed deep copy is returned.
Shapes and dtypes do not change, so a cost model and the targets carry over unchanged.

The package, one module per step: :mod:`.spec` (the spec), :mod:`.rules` (the fold rules and a
model's fold plan), :mod:`.stats` (the calibration statistics), :mod:`.scales` (the scale math
and the fold itself), :mod:`.transform` (:func:`precondition_model`), :mod:`.record` (the
record a plan carries).
"""

from __future__ import annotations

from mpq.precondition.record import (
    RECORD_VERSION,
    PreconditionRecord,
    record_of,
    spec_from_plan,
)
from mpq.precondition.rules import (
    LLAMA_RULES,
    SUPPORTED,
    FoldedEntry,
    FoldGroup,
    FoldReport,
    FoldRule,
    plan_folds,
)
from mpq.precondition.spec import ALL_GROUPS, METHODS, PreconditionSpec
from mpq.precondition.stats import GroupStats, collect_stats
from mpq.precondition.transform import (
    MIN_AWQ_TOKENS,
    MIN_SF_TOKENS,
    Preconditioned,
    precondition_model,
)

__all__ = [
    "ALL_GROUPS",
    "LLAMA_RULES",
    "METHODS",
    "MIN_AWQ_TOKENS",
    "MIN_SF_TOKENS",
    "RECORD_VERSION",
    "SUPPORTED",
    "FoldGroup",
    "FoldReport",
    "FoldRule",
    "FoldedEntry",
    "GroupStats",
    "PreconditionRecord",
    "PreconditionSpec",
    "Preconditioned",
    "collect_stats",
    "plan_folds",
    "precondition_model",
    "record_of",
    "spec_from_plan",
]
