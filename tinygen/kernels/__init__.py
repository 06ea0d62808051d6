"""GPU kernels (Triton), each beside the plain-PyTorch path it replaces; imported only where triton is present."""
from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether the triton package can be imported (its kernels then run on CUDA tensors, or on CPU tensors under
    TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
