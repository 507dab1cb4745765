"""mpq: mixed-precision bit-allocation search.

Estimators score layers, a problem builder turns scores into one candidate table, any solver
turns that table into a bit plan, the executor applies the plan, and the harness measures what
it cost and what it lost.

The top-level names load lazily, so ``import mpq.solvers`` pulls in numpy only, never torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "MpqError": "mpq.errors",
    "QuantFormat": "mpq.formats",
    "BitPlan": "mpq.plan",
    "Target": "mpq.targets",
    "discover": "mpq.targets",
    "apply_plan": "mpq.executor",
    "build_cost_model": "mpq.cost",
    "load_model": "mpq.models",
    "load": "mpq.export.load",
}

if TYPE_CHECKING:
    from mpq.cost import build_cost_model
    from mpq.errors import MpqError
    from mpq.executor import apply_plan
    from mpq.export.load import load
    from mpq.formats import QuantFormat
    from mpq.models import load_model
    from mpq.plan import BitPlan
    from mpq.targets import Target, discover


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpq' has no attribute {name!r}")


__all__ = [
    "BitPlan",
    "MpqError",
    "QuantFormat",
    "Target",
    "__version__",
    "apply_plan",
    "build_cost_model",
    "discover",
    "load",
    "load_model",
]
