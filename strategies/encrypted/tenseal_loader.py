"""Import TenSEAL so that it works whether or not TensorFlow was imported first.

TenSEAL's extension is linked with its own protobuf; TensorFlow's shared libraries export
protobuf symbols too. When TensorFlow is loaded first (``flwr.simulation`` imports it whenever it
is installed), the dynamic linker binds TenSEAL's protobuf calls to TensorFlow's copy and
deserialising a TenSEAL context segfaults (seen here with TenSEAL 0.3.18 and TensorFlow 2.21).
Loading the extension with ``RTLD_DEEPBIND`` (glibc) makes it prefer its own symbols, in either
import order. Import ``tenseal`` from here: ``from strategies.encrypted.tenseal_loader import tenseal``.
"""

from __future__ import annotations

import os
import sys

_DEEPBIND = getattr(os, "RTLD_DEEPBIND", 0)

if "tenseal" in sys.modules or not _DEEPBIND:
    import tenseal
else:
    _flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_NOW | _DEEPBIND)
    try:
        import tenseal
    finally:
        sys.setdlopenflags(_flags)

__all__ = ["tenseal"]
