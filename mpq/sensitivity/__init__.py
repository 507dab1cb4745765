"""Sensitivity estimators: how much each layer (at each format) hurts the model when quantized.

Every estimator returns a :class:`SensitivityTable` through the one runner,
:func:`run_estimator`; :func:`make_estimator` builds one by name (:data:`mpq.registry.ESTIMATORS`):

=================  ==========================================  ================================
name               method (paper)                              table distortion
=================  ==========================================  ================================
``hessian_eig``    top Hessian-block eigenvalue (HAWQ)          1/2 abs(lambda) ||dW||^2
``hessian_trace``  Hutchinson block trace (HAWQ-V2/V3)          1/2 max(tr/n, 0) ||dW||^2
``fisher``         empirical Fisher / GWQ gradient outliers     1/2 (sum F / n) ||dW||^2
``taylor``         g.dW and 1/2 dW' diag(F) dW (CPTQuant TDMPQ)  abs(first) + second per format
``correlation``    fp vs quantized output CCA (CPTQuant CMPQ)   1 - mean rho per format
``pruning``        loss change at p sparsity (CPTQuant PMPQ)    dL ||dW||^2 / ||dW_prune||^2
``measured``       ΔKL / Δloss, one layer quantized (ZeroQ,     measured per format
                   MixDQ)
``activation``     input range, kurtosis, outliers (HAWQ-V2     nominal score ||dW||^2
                   W+A)
=================  ==========================================  ================================

Names load lazily: importing this package does not import torch (``mpq.problem`` reads
tables without it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mpq.registry import ESTIMATORS as _REGISTRY

#: every estimator name of :data:`mpq.registry.ESTIMATORS`, sorted (no torch import).
ESTIMATOR_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))

_LAZY = {
    "SensitivityTable": "mpq.sensitivity.table",
    "TargetCache": "mpq.sensitivity.cache",
    "Estimator": "mpq.sensitivity.base",
    "EstimatorBase": "mpq.sensitivity.base",
    "TargetResult": "mpq.sensitivity.base",
    "Context": "mpq.sensitivity.base",
    "Calibration": "mpq.sensitivity.loss",
    "task_loss": "mpq.sensitivity.loss",
    "HessianEigen": "mpq.sensitivity.hessian",
    "HessianTrace": "mpq.sensitivity.hessian",
    "Fisher": "mpq.sensitivity.gradient",
    "Taylor": "mpq.sensitivity.gradient",
    "Correlation": "mpq.sensitivity.correlation",
    "cca": "mpq.sensitivity.correlation",
    "Pruning": "mpq.sensitivity.pruning",
    "Measured": "mpq.sensitivity.measured",
    "measured_damage": "mpq.sensitivity.measured",
    "ActivationStats": "mpq.sensitivity.activations",
    "ESTIMATORS": "mpq.sensitivity.runner",
    "make_estimator": "mpq.sensitivity.runner",
    "parse_params": "mpq.sensitivity.runner",
    "run_estimator": "mpq.sensitivity.runner",
    "plot_sensitivity": "mpq.sensitivity.plot",
}

if TYPE_CHECKING:
    from mpq.sensitivity.activations import ActivationStats
    from mpq.sensitivity.base import Context, Estimator, EstimatorBase, TargetResult
    from mpq.sensitivity.cache import TargetCache
    from mpq.sensitivity.correlation import Correlation, cca
    from mpq.sensitivity.gradient import Fisher, Taylor
    from mpq.sensitivity.hessian import HessianEigen, HessianTrace
    from mpq.sensitivity.loss import Calibration, task_loss
    from mpq.sensitivity.measured import Measured, measured_damage
    from mpq.sensitivity.plot import plot_sensitivity
    from mpq.sensitivity.pruning import Pruning
    from mpq.sensitivity.runner import ESTIMATORS, make_estimator, parse_params, run_estimator
    from mpq.sensitivity.table import SensitivityTable


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpq.sensitivity' has no attribute {name!r}")


__all__ = [
    "ESTIMATOR_NAMES",
    "ActivationStats",
    "Calibration",
    "Context",
    "Correlation",
    "ESTIMATORS",
    "Estimator",
    "EstimatorBase",
    "Fisher",
    "HessianEigen",
    "HessianTrace",
    "Measured",
    "Pruning",
    "SensitivityTable",
    "TargetCache",
    "TargetResult",
    "Taylor",
    "cca",
    "make_estimator",
    "measured_damage",
    "parse_params",
    "plot_sensitivity",
    "run_estimator",
    "task_loss",
]
