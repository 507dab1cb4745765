"""The reference backend: dequantize the whole weight, ``F.linear``. Any device, any format; the
oracle every other backend is tested against (see :class:`mpq.kernels.backends.Backend`)."""

from __future__ import annotations

from mpq.kernels.backends import Backend

BACKEND = Backend("reference")
