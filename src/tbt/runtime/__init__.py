"""Torch-free runtime: numpy plus tbt's own kernels, so an exported model runs without torch.

``tbt.runtime.linear.PackedLinearNP`` runs one packed linear layer (numpy in, numpy out;
``from_packed_dir`` reads it from a ``save_packed`` checkpoint).
``tbt.runtime.kernels`` holds the kernel registry (``get_kernel("t2", "a8")``), the numpy
reference (normative) and the native C kernels; this package must never import torch
(docs/architecture.md; ``tests/runtime/test_runtime_no_torch.py`` checks it).
"""

from __future__ import annotations

from tbt.runtime.kernels import (QuantizedActivation, available_backends, get_kernel,
                                 quantize_a1, quantize_a2, quantize_a8, set_num_threads)
from tbt.runtime.linear import ActSpec, PackedLinearNP

__all__ = ["get_kernel", "available_backends", "set_num_threads", "QuantizedActivation",
           "quantize_a8", "quantize_a2", "quantize_a1", "ActSpec", "PackedLinearNP"]
