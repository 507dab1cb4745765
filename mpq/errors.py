"""The one exception type mpq raises for bad input.

Every message names the problem and the fix; the CLI prints it without a traceback.
"""

from __future__ import annotations


class MpqError(ValueError):
    """Bad input: an unknown model, a malformed plan, an infeasible budget, empty data..."""
