"""What a quantized model lost, against its own fp32 outputs and, where there are labels, the truth.

One evaluation loop serves every model family through a :class:`~mpq.tasks.Task`, whose head
turns a batch into logits ``[units, positions, classes]`` (units: text windows, documents or
images). Per unit we record the mean KL(fp || quantized), top-1 agreement with fp, and (with
labels) the mean NLL and accuracy. Standard errors are over units; perplexity's 95% interval is
``exp(mean NLL +- 1.96 se)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mpq.errors import MpqError
from mpq.tasks import Task

Z95 = 1.959963984540054


@dataclass(frozen=True)
class RefBatch:
    """What :func:`batch_stats` needs of the fp model's outputs on one batch, beyond its logits:
    the float64 ``logsumexp`` ``lse`` and the ``argmax`` per position ``[U, P]`` (a few bytes per
    position; the float64 probabilities themselves would be 8 bytes per position and class)."""

    logits: torch.Tensor
    lse: torch.Tensor
    argmax: torch.Tensor


def ref_batch(ref_logits: torch.Tensor) -> RefBatch:
    """The reference statistics of one batch of fp logits ``[U, P, C]`` (or log-probabilities:
    normalizing again changes nothing)."""
    lse = torch.stack([torch.logsumexp(unit.double(), dim=-1) for unit in ref_logits])
    return RefBatch(logits=ref_logits, lse=lse, argmax=ref_logits.argmax(-1))


@dataclass(frozen=True)
class Reference:
    """The fp model's logits on every batch of one task, computed once (float32).

    Stored as logits, not log-probabilities: :func:`batch_stats` works from the reference's
    float64 ``logsumexp`` (:class:`RefBatch`, computed on first use per batch and kept on the
    reference, so evaluating many plans against one reference computes it once), so identical
    logits give a KL of exactly 0 and a KL far below float32's resolution is still resolved.
    """

    logits: tuple[torch.Tensor, ...]
    _batches: dict[int, RefBatch] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def batch(self, i: int) -> RefBatch:
        """Batch ``i``'s :class:`RefBatch`, computed once."""
        found = self._batches.get(i)
        if found is None:
            found = self._batches[i] = ref_batch(self.logits[i])
        return found


def reference(task: Task, model: nn.Module, progress: bool = False) -> Reference:
    """The fp model's logits on ``task``; MpqError when any is NaN or infinite (broken
    weights: every comparison against them would be meaningless)."""
    out = []
    with torch.no_grad():
        for batch in tqdm(task.batches, desc="fp reference", disable=not progress, leave=False):
            logits = task.head(model, batch).float()
            if not bool(torch.isfinite(logits).all()):
                raise MpqError(
                    f"the fp model gives non-finite logits (NaN or inf) on {task.key}: its "
                    f"weights are damaged or overflow; check the model folder (a bundled model "
                    f"is rebuilt when its checksum fails: delete $MPQ_CACHE/models to force it)"
                )
            out.append(logits)
    return Reference(tuple(out))


@dataclass(frozen=True)
class UnitStats:
    """Per-unit measurements of one evaluation (one row per window / document / image)."""

    kl: torch.Tensor
    agree: torch.Tensor
    nll: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    positions: int = 1


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    mean = float(x.mean())
    se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
    return mean, se


@dataclass(frozen=True)
class EvalResult:
    """Summary metrics, and the per-unit values they came from (so results can be pooled)."""

    metrics: dict[str, float] = field(default_factory=dict)
    units: dict[str, list[float]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]


def pool(results: Sequence[EvalResult]) -> EvalResult:
    """One result over the units of several (e.g. one per seed): CIs over units and seeds."""
    keys = set.intersection(*(set(r.units) for r in results)) if results else set()
    if not keys:
        raise MpqError("cannot pool evaluations without per-unit values; re-run them")
    positions = sum(r.metrics.get("n_positions", 0.0) for r in results)
    units = {k: [x for r in results for x in r.units[k]] for k in sorted(keys)}
    stats = UnitStats(
        kl=torch.tensor(units["kl"], dtype=torch.float64),
        agree=torch.tensor(units["agree"], dtype=torch.float64),
        nll=torch.tensor(units["nll"], dtype=torch.float64) if "nll" in units else None,
        correct=torch.tensor(units["correct"], dtype=torch.float64) if "correct" in units else None,
    )
    out = summarize([stats])
    out.metrics["n_positions"] = positions
    return out


# Positions per float64 step of :func:`batch_stats`: its temporaries are a few [rows, C] float64
# tensors, small enough to stay in cache (16 x 49152 x 8 bytes = 6 MB for SmolLM2's vocabulary;
# 64 rows ran 2x slower on a 4 MB-L2 CPU).
ROWS = 16


def _unit_stats(
    z32: torch.Tensor, r32: torch.Tensor, lse_r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of one unit: KL(p || q) and ``lse(z)`` (float64) and ``argmax z``, from
    logits ``z`` and reference logits ``r`` ``[P, C]``.

    With ``p = exp(r - lse_r)`` and ``d = z - r``: ``log p - log q = lse(z) - lse_r - d`` and
    ``lse(z) - lse_r = log(sum p e^d) = log1p(sum p (e^d - 1))``, so
    ``KL = log1p(sum p (e^d - 1)) - sum p d``: no large terms cancel, and ``d = 0`` gives exactly
    0. Where ``sum p e^d < 1/2`` (a position the model lost, where ``log1p`` would cancel) or
    ``e^d`` overflows, ``lse(z)`` is taken directly."""
    kls, lses, preds = [], [], []
    for s in range(0, z32.shape[0], ROWS):
        preds.append(z32[s : s + ROWS].argmax(-1))
        z, r, lr = z32[s : s + ROWS].double(), r32[s : s + ROWS].double(), lse_r[s : s + ROWS]
        p = (r - lr[:, None]).exp_()
        d = z.sub_(r)
        pd = torch.bmm(p[:, None, :], d[:, :, None]).reshape(-1)
        # e^d - 1 rather than expm1 (8x slower on CPU): its absolute error is the same 1e-16
        # as lse's, and d = 0 still gives exactly 0.
        ped = torch.bmm(p[:, None, :], d.exp_().sub_(1.0)[:, :, None]).reshape(-1)
        shift = torch.log1p(ped)
        # sum p e^d < 1/2: the "+ 1" inside log1p would cancel most of its digits, and where
        # e^d overflows there is nothing to take; lse(z) directly is exact to float64 there.
        far = (ped < -0.5) | ~torch.isfinite(shift)
        if bool(far.any()):
            lse_z = torch.logsumexp(z32[s : s + ROWS].double(), dim=-1)
            shift = torch.where(far, lse_z - lr, shift)
        kls.append(shift - pd)
        lses.append(lr + shift)
    return torch.cat(kls), torch.cat(lses), torch.cat(preds)


def batch_stats(
    logits: torch.Tensor, ref: torch.Tensor | RefBatch, labels: torch.Tensor | None
) -> UnitStats:
    """Per-unit KL, agreement, NLL and accuracy from logits ``[U, P, C]``.

    ``ref`` is the fp model's :class:`RefBatch` (``Reference.batch(i)``), or its logits (or
    log-probabilities: normalizing again changes nothing). Everything is computed in float64: a
    float32 KL carries summation noise at the 1e-7 level, which is the size of an 8-bit layer's
    true damage on a small model.
    """
    rb = ref if isinstance(ref, RefBatch) else ref_batch(ref)
    kls, agrees, nlls, corrects = [], [], [], []
    for u in range(logits.shape[0]):  # one unit at a time, ROWS positions at a time
        kl, lse, pred = _unit_stats(logits[u], rb.logits[u], rb.lse[u])
        kls.append(kl.mean(-1))
        agrees.append((pred == rb.argmax[u]).double().mean(-1))
        if labels is not None:
            picked = logits[u].gather(-1, labels[u][..., None]).squeeze(-1).double()
            nlls.append((lse - picked).mean(-1))
            corrects.append((pred == labels[u]).double().mean(-1))
    kl_t, agree = torch.stack(kls), torch.stack(agrees)
    nll = correct = None
    if labels is not None:
        nll, correct = torch.stack(nlls), torch.stack(corrects)
    return UnitStats(kl=kl_t, agree=agree, nll=nll, correct=correct, positions=logits.shape[1])


def summarize(stats: Sequence[UnitStats]) -> EvalResult:
    kl = torch.cat([s.kl for s in stats])
    agree = torch.cat([s.agree for s in stats])
    m: dict[str, float] = {"n_units": float(kl.numel())}
    m["n_positions"] = float(sum(s.kl.numel() * s.positions for s in stats))
    m["kl"], m["kl_se"] = _mean_se(kl)
    m["agree"], m["agree_se"] = _mean_se(agree)
    if all(s.nll is not None for s in stats):
        nll = torch.cat([s.nll for s in stats if s.nll is not None])
        m["nll"], m["nll_se"] = _mean_se(nll)
        se = m["nll_se"] if math.isfinite(m["nll_se"]) else 0.0
        m["ppl"] = math.exp(m["nll"])
        m["ppl_lo"] = math.exp(m["nll"] - Z95 * se)
        m["ppl_hi"] = math.exp(m["nll"] + Z95 * se)
    units = {"kl": kl.tolist(), "agree": agree.tolist()}
    if all(s.correct is not None for s in stats):
        correct = torch.cat([s.correct for s in stats if s.correct is not None])
        m["acc"], m["acc_se"] = _mean_se(correct)
        units["correct"] = correct.tolist()
    if "nll" in m:
        units["nll"] = torch.cat([s.nll for s in stats if s.nll is not None]).tolist()
    return EvalResult(m, units)


def _evaluate(
    task: Task,
    ref: Reference,
    logits: Callable[[int, Any], torch.Tensor],
    *,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Per-unit statistics of ``logits(i, batch)`` on every batch of ``task`` against ``ref``."""
    if len(ref.logits) != len(task.batches):
        raise MpqError("reference and task have different batches; recompute the reference")
    stats = []
    with torch.no_grad():
        for i, batch in enumerate(tqdm(task.batches, desc=desc, disable=not progress, leave=False)):
            labels = task.labels[i] if task.labels is not None else None
            stats.append(batch_stats(logits(i, batch), ref.batch(i), labels))
    return summarize(stats)


def evaluate(
    task: Task,
    model: nn.Module,
    ref: Reference,
    *,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate ``model`` on ``task`` against the fp reference ``ref``."""
    return _evaluate(
        task, ref, lambda _i, batch: task.head(model, batch), progress=progress, desc=desc
    )


def evaluate_reference(task: Task, ref: Reference) -> EvalResult:
    """The fp model's own evaluation, read off its reference logits: what :func:`evaluate` of
    the model that gave ``ref`` returns (KL exactly 0, agreement 1), without running it again."""
    return _evaluate(task, ref, lambda i, _batch: ref.logits[i])
