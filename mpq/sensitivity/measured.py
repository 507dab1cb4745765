"""Measured damage (ZeroQ, MixDQ): quantize one target alone, measure what the output lost.

(ZeroQ, "A Novel Zero Shot Quantization Framework": the KL divergence of the outputs when one
layer is quantized; MixDQ, "Memory-Efficient Few-Step Text-to-Image Diffusion Models with
Metric-Decoupled Mixed Precision Quantization": per-layer sensitivity measured on the outputs,
one metric per concern.) For every target and candidate format, the target's
weight is fake-quantized in place, the model is run on the calibration batches, and

- ``kl``: the mean KL(fp || quantized) of the output distributions (the same number as
  :func:`mpq.evaluate.evaluate`'s ``kl``), and
- ``loss``: the change of the calibration loss (:mod:`mpq.sensitivity.loss`: cross-entropy
  against the labels, or the fp model's pseudo-labels)

are recorded; the weight is restored exactly afterwards. ``metric`` picks which one is the
table's distortion (both are cached together, so switching is free); the table clamps
negative values to 0 and its score is the largest distortion over the formats.

**Anchored** (``anchor=<format>``): only the anchor format is measured; every other format's
damage is the anchor's scaled by the layer's output error, ``d(f) = d(anchor) * E(f) /
E(anchor)`` with ``E(f) = tr(dW_f H dW_f^T)`` (``H = E[x x^T]`` the layer's input second
moment from the statistics windows, its diagonal where the full matrix was not collected;
``dW_f`` the format's weight error). In the small-error regime the KL of quantizing one layer is
a quadratic form in its output error, so the ratio carries the measured downstream
sensitivity of the layer to formats that were not run; the cost is one format per layer
instead of all, which buys more calibration tokens (a test holds the ratio against the fully
measured table). ``E`` uses the statistics of the ``[statistics]`` windows when given.

Two paths give the same numbers (a test holds them within 1e-6 relative): the plain one runs
the whole model per (target, format); the cached one (``path="auto"``, the default, on
decoder-only language models that :mod:`mpq.sensitivity.blocks` recognizes) runs only the
target's block per format, then the rest of the model once for all of a target's formats
stacked, and scores every format against reference statistics computed once per batch
(:func:`ref_stats`, :func:`fast_stats`: the same float64 KL and NLL with one ``logsumexp``
and one dot product per format instead of two ``log_softmax``). Targets outside the blocks
(embeddings, the head) and models it does not recognize use the plain path; the reason is
logged once (logger ``mpq.sensitivity``). A tied embedding/head (one target) changes both the
lookup that feeds block 0 and the head, so no cached block input applies: it runs the whole
model once per format, about what a block-0 target costs. Its ``mse`` formats are weighted by
the head's input importance (:mod:`mpq.layerstats`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from mpq.errors import MpqError
from mpq.evaluate import Reference, batch_stats, evaluate
from mpq.formats import QuantFormat
from mpq.quant.quantize import QuantizedTensor, fake_quantize
from mpq.sensitivity.base import Context, EstimatorBase, TargetResult, choice, fits
from mpq.sensitivity.blocks import MAX_ROWS, BlockCache, capture
from mpq.sensitivity.loss import logits_loss
from mpq.sensitivity.table import SensitivityTable
from mpq.targets import Target
from mpq.tasks import Task

ESTIMATOR = "measured_kl"
PATHS = ("auto", "plain")

log = logging.getLogger("mpq.sensitivity")


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (float64); one unit has no spread, so its se is 0."""
    x = values.double().flatten()
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else 0.0
    return float(x.mean()), se


def measure_target(
    model: nn.Module, target: Target, formats: Sequence[QuantFormat], task: Task, ref: Reference
) -> dict[str, float]:
    """KL of the model's outputs when only ``target`` is quantized, per format spec."""
    weight = model.get_submodule(target.name).weight
    assert isinstance(weight, torch.Tensor)
    original = weight.detach().clone()
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            for fmt in formats:
                weight.copy_(fake_quantize(original, fmt))
                out[fmt.spec()] = max(evaluate(task, model, ref)["kl"], 0.0)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    return out


@dataclass(frozen=True)
class RefStats:
    """The fp model's output distribution on one batch, in float64, for :func:`fast_stats`:
    ``p`` ``[U, P, C]``, ``plogp`` = sum p log p and ``mass`` = sum p per position ``[U, P]``."""

    p: torch.Tensor
    plogp: torch.Tensor
    mass: torch.Tensor


def ref_stats(ref_logits: torch.Tensor) -> RefStats:
    logp = torch.log_softmax(ref_logits.double(), dim=-1)
    p = logp.exp()
    # 0 * log 0 = 0, as in mpq.evaluate.batch_stats.
    plogp = torch.where(p > 0, p * logp, 0.0).sum(-1)
    return RefStats(p=p, plogp=plogp, mass=p.sum(-1))


def fast_stats(
    logits: torch.Tensor, ref: RefStats, labels: torch.Tensor, batch_index: int
) -> tuple[torch.Tensor, float]:
    """Per-unit KL(fp || q) and the mean NLL of ``logits`` ``[U, P, C]``, both float64.

    The same quantities as :func:`mpq.evaluate.batch_stats` and
    :func:`~mpq.sensitivity.loss.logits_loss`: with ``log q = z - lse(z)``,
    ``KL = sum p log p - sum p z + lse(z) sum p`` and ``NLL = lse(z) - z[label]``."""
    z = logits.double()
    lse = torch.logsumexp(z, dim=-1)
    u, pos, c = z.shape
    cross = torch.bmm(z.reshape(u * pos, 1, c), ref.p.reshape(u * pos, c, 1)).reshape(u, pos)
    kl = (ref.plogp - cross + lse * ref.mass).mean(-1)
    nll = float((lse - z.gather(-1, labels[..., None].long()).squeeze(-1)).mean())
    if not math.isfinite(nll):
        raise MpqError(
            f"the loss on calibration batch {batch_index} is {nll}; the model's outputs are "
            f"not finite (check the model and the calibration data)"
        )
    return kl, nll


@dataclass(frozen=True)
class Measured(EstimatorBase):
    """ZeroQ / MixDQ measured damage: ΔKL and Δloss with only one target quantized.

    ``path``: ``auto`` uses the cached block inputs where the model allows (module docstring),
    ``plain`` always runs the whole model; both give the same numbers, so it is not part of the
    cache key."""

    name: ClassVar[str] = "measured"
    per_format: ClassVar[bool] = True
    view_params: ClassVar[tuple[str, ...]] = ("metric", "path")

    metric: str = "kl"
    path: str = "auto"
    #: a format spec: measure only this format and scale it to the others (module docstring)
    anchor: str = ""

    def __post_init__(self) -> None:
        choice(self.metric, ("kl", "loss"), "metric")
        choice(self.path, PATHS, "path")
        if self.anchor:
            QuantFormat.parse(self.anchor)  # a clear error for a bad spec

    def uses_input_stats(self) -> bool:
        return bool(self.anchor)

    def label(self) -> str:
        return f"measured_{self.metric}"

    def distortion_row(self) -> str:
        return self.metric

    def score(self, result: TargetResult, target: Target) -> float:
        row = result.distortions.get(self.metric, {})
        return max([max(v, 0.0) for v in row.values()], default=0.0)

    def compute(self, ctx: Context, targets: Sequence[Target]) -> dict[str, TargetResult]:
        ref = ctx.reference()
        labels = ctx.calib.labels()
        base = ctx.calib.base_loss()
        blocks = self._blocks(ctx)
        out = {}
        anchor = QuantFormat.parse(self.anchor) if self.anchor else None
        for t in targets:
            fmts = ctx.fitting_formats(t)
            if anchor is not None:
                if not fits(t, anchor):
                    raise MpqError(
                        f"{t.name}: anchor format {anchor.spec()} does not fit this target; "
                        f"pick an anchor every target can store (e.g. a per-channel format)"
                    )
                everything, fmts = fmts, [anchor]
            block = None if blocks is None else blocks.block_of([t.name, *t.aliases])
            # Each format of this target is quantized once: the measured ones, the output
            # errors that carry the anchor to the rest, and the parts of row/column mixes.
            parts: MutableMapping[str, QuantizedTensor] = (
                {} if ctx.quant_store is None else ctx.quant_store.view(t.name)
            )
            if blocks is not None and block is not None:
                kls, losses = _cached_target(ctx, t, fmts, blocks, block, ref, labels, parts)
            else:
                kls, losses = _plain_target(ctx, t, fmts, ref, labels, parts)
            kl: dict[str, float] = {}
            dloss: dict[str, float] = {}
            kl_se: dict[str, float] = {}
            loss_se: dict[str, float] = {}
            for spec in kls:
                kl[spec], kl_se[spec] = _mean_se(torch.cat(kls[spec]))
                mean_loss, loss_se[spec] = _mean_se(torch.tensor(losses[spec], dtype=torch.float64))
                dloss[spec] = mean_loss - base
            rows = {"kl": kl, "loss": dloss, "kl_se": kl_se, "loss_se": loss_se}
            if anchor is not None:
                rest = [f for f in everything if f.spec() != anchor.spec()]
                errors = output_errors(ctx, t, [anchor, *rest], parts)
                rows = _scaled(rows, anchor, errors)
            out[t.name] = TargetResult(values={}, distortions=rows)
        return out

    def _blocks(self, ctx: Context) -> BlockCache | None:
        """The block cache (captured on the first call with the fp weights), or None."""
        if self.path == "plain":
            return None
        if "blocks" not in ctx.memo:
            got = capture(ctx.model, ctx.task)
            if isinstance(got, str):
                log.info("measured damage: plain path (%s)", got)
                ctx.memo["blocks"] = None
            else:
                ctx.memo["blocks"] = got
        found = ctx.memo["blocks"]
        return found if isinstance(found, BlockCache) else None


PerFormat = tuple[dict[str, list[torch.Tensor]], dict[str, list[float]]]


def output_error(dw: torch.Tensor, diag: torch.Tensor | None, full: torch.Tensor | None) -> float:
    """``tr(dW H dW^T)`` for a ``[rows, cols]`` weight error: the mean squared output error per
    input row, with ``H`` the full input second moment, else its diagonal, else the identity."""
    d = dw.double()
    if full is not None:
        return float(((d @ full.double()) * d).sum())
    if diag is not None:
        return float((d * d * diag.double()).sum())
    return float((d * d).sum())


def output_errors(
    ctx: Context,
    t: Target,
    fmts: Sequence[QuantFormat],
    parts: MutableMapping[str, QuantizedTensor] | None = None,
) -> dict[str, float]:
    """:func:`output_error` of ``t`` at each format (its input statistics when collected).
    ``parts``: the caller's memo of ``t``'s quantized formats by spec (read and filled)."""
    w = ctx.weight(t).detach()
    st = ctx.stats.get(t.name)
    rows = w.reshape(w.shape[0], -1)
    out = {}
    parts = {} if parts is None else parts  # row-mixed formats reuse the plain ones
    for f in sorted(fmts, key=lambda f: f.hi is not None):
        dw = (ctx.quantized(t, w, f, parts) - w).reshape(rows.shape)
        out[f.spec()] = output_error(
            dw, None if st is None else st.diag, None if st is None else st.full
        )
    return out


def _scaled(
    rows: dict[str, dict[str, float]], anchor: QuantFormat, errors: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Every format's damage as the anchor's times its output-error ratio (se likewise)."""
    a = anchor.spec()
    e0 = errors[a]
    out: dict[str, dict[str, float]] = {k: {} for k in rows}
    for spec, e in errors.items():
        r = e / e0 if e0 > 0 else 0.0
        for k, row in rows.items():
            out[k][spec] = row[a] * r
    return out


# Reference statistics of every batch are kept for the whole run when they fit in this much
# memory (float64 probabilities: 8 bytes per position and class); otherwise per target. 2 GiB
# holds a 4k-token table of a 49k vocabulary (1.6 GB), so the calibration study's largest
# table does not recompute them 210 times.
REF_STATS_BYTES = 2 * 2**30


def _ref_stats(ctx: Context, ref: Reference, batch: int) -> RefStats:
    total = sum(8 * x.numel() for x in ref.logits)
    if total > REF_STATS_BYTES:
        return ref_stats(ref.logits[batch])
    memo: dict[int, RefStats] = ctx.memo.setdefault("ref_stats", {})
    if batch not in memo:
        memo[batch] = ref_stats(ref.logits[batch])
    return memo[batch]


def _plain_target(
    ctx: Context,
    t: Target,
    fmts: Sequence[QuantFormat],
    ref: Reference,
    labels: Sequence[torch.Tensor],
    parts: MutableMapping[str, QuantizedTensor] | None = None,
) -> PerFormat:
    """Per format: per-unit KLs and per-batch losses from whole-model runs (``parts``: the
    caller's memo of the target's quantized formats)."""
    weight = ctx.weight(t)
    original = weight.detach().clone()
    kls: dict[str, list[torch.Tensor]] = {}
    losses: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            for fmt in fmts:
                weight.copy_(ctx.quantized(t, original, fmt, parts))
                spec = fmt.spec()
                kls[spec], losses[spec] = [], []
                for i, batch in enumerate(ctx.task.batches):
                    logits = ctx.task.head(ctx.model, batch)
                    kls[spec].append(batch_stats(logits, ref.batch(i), None).kl)
                    losses[spec].append(float(logits_loss(logits, labels[i], i)))
    finally:
        with torch.no_grad():
            weight.copy_(original)
    return kls, losses


def _cached_target(
    ctx: Context,
    t: Target,
    fmts: Sequence[QuantFormat],
    blocks: BlockCache,
    block: int,
    ref: Reference,
    labels: Sequence[torch.Tensor],
    parts: MutableMapping[str, QuantizedTensor] | None = None,
) -> PerFormat:
    """The same numbers as :func:`_plain_target` from block ``block`` on (module docstring)."""
    weight = ctx.weight(t)
    original = weight.detach().clone()
    specs = [f.spec() for f in fmts]
    kls: dict[str, list[torch.Tensor]] = {s: [] for s in specs}
    losses: dict[str, list[float]] = {s: [] for s in specs}
    quantized = [ctx.quantized(t, original, f, parts) for f in fmts]
    with torch.no_grad():
        for b in range(len(blocks.batches)):
            hidden = []
            try:
                for q in quantized:
                    weight.copy_(q)
                    hidden.append(blocks.hidden_after(block, b))
            finally:
                weight.copy_(original)
            if not hidden:
                continue
            rs = _ref_stats(ctx, ref, b)
            rows = int(hidden[0].shape[0] * hidden[0].shape[1])
            step = max(1, MAX_ROWS // max(rows, 1))
            for start in range(0, len(hidden), step):
                chunk = hidden[start : start + step]
                logits = blocks.tail_logits(block + 1, b, chunk)
                units = chunk[0].shape[0]
                for j in range(len(chunk)):
                    spec = specs[start + j]
                    kl, nll = fast_stats(logits[j * units : (j + 1) * units], rs, labels[b], b)
                    kls[spec].append(kl)
                    losses[spec].append(nll)
    return kls, losses


def measured_damage(
    model: nn.Module,
    targets: Sequence[Target],
    formats: Sequence[QuantFormat],
    task: Task,
    ref: Reference,
    *,
    model_id: str,
    cache_root: Path | None = None,
    progress: bool = True,
    on_target: Callable[[str], None] | None = None,
    metric: str = "kl",
) -> SensitivityTable:
    """Per-(target, format) KL (or Δloss) damage, cached per target under ``cache_root``.

    A thin wrapper over :func:`mpq.sensitivity.runner.run_estimator` with :class:`Measured`.
    ``on_target(name)`` is called after each newly computed target (used by the resume test).
    """
    from mpq.sensitivity.runner import run_estimator

    return run_estimator(
        Measured(metric=metric),
        model,
        targets,
        task,
        model_id=model_id,
        formats=formats,
        cache_root=cache_root,
        progress=progress,
        on_target=on_target,
        reference=ref,
    )
