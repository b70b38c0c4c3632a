"""``tbt.runtime`` must import and run without torch (docs/architecture.md): numpy + its own kernels."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
import numpy as np
import tbt.runtime
from tbt.runtime import kernels
from tbt.export.pack import pack_ternary
from tbt.export.format import FormatHeader
q = np.array([[1, 0, -1, 1, 1]], dtype=np.int8)
for backend in kernels.available_backends():
    k = kernels.get_kernel('t2', 'a8', backend)
    w = k.prepare_weight(pack_ternary(q), 5, np.array([0.5], np.float32))
    y = k(w, kernels.quantize_a8(np.array([[1.0, 2.0, 3.0, -1.0, 0.5]])))
    assert y.shape == (1, 1), y.shape
FormatHeader.from_metadata(FormatHeader().to_metadata())
loaded = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]
assert loaded == ['torch'] and sys.modules['torch'] is None, loaded
print('ok', kernels.available_backends())
"""


def test_runtime_imports_and_runs_without_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
