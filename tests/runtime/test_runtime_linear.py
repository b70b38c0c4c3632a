"""tbt.runtime.linear: activation quantizers vs torch's, PackedLinearNP vs float64, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tbt.export.format import Packing
from tbt.export.pack import pack
from tbt.runtime.kernels import available_backends
from tbt.runtime.linear import ActSpec, PackedLinearNP, quantize_activation

SPECS = [
    ActSpec("minmax", 8, True, clip=2.5), ActSpec("minmax", 8, False, clip=2.5),
    ActSpec("elastic", 2, True, variant="paper", alpha=0.3),
    ActSpec("elastic", 2, True, variant="released", alpha=0.3),
    ActSpec("elastic", 2, False, variant="paper", alpha=0.3),
    ActSpec("elastic", 2, False, variant="released", alpha=0.3),
    ActSpec("elastic", 1, True, variant="paper", alpha=0.3),
    ActSpec("elastic", 1, False, variant="released", alpha=0.3),
    ActSpec("absmax-token", 8), ActSpec("absmax-token", 4),  # per-token scales
]


def _torch_quantizer(spec: ActSpec):
    import torch

    from tbt.quant.act_methods import AbsmaxTokenQuantizer
    from tbt.quant.activation import ElasticQuantizer, MinMaxQuantizer

    if spec.kind == "absmax-token":
        return AbsmaxTokenQuantizer(spec.bits)
    if spec.kind == "minmax":
        return MinMaxQuantizer(8, spec.signed, spec.clip)
    q = ElasticQuantizer(spec.bits, spec.signed, spec.variant)
    with torch.no_grad():
        q.alpha.fill_(spec.alpha)
    q._initialized = True
    return q.eval()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{s.bits}-{s.signed}-{s.variant}")
def test_act_quantizers_match_torch(spec):
    """Lattice inputs (many exact .5 ties): the codes must be torch's, not just close."""
    torch = pytest.importorskip("torch")
    q = _torch_quantizer(spec)
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        step = float(torch.rand(1, generator=g)) * 0.1 + 0.01
        x = torch.randint(-40, 41, (3, 37), generator=g).float() * step
        if not spec.signed:
            x = x.abs() - 0.5 * step * (seed % 2)  # GELU-like: mostly non-negative
        with torch.no_grad():
            want = q(x).numpy()
        shift = float(x.mean()) if spec.needs_mean else None
        got = quantize_activation(x.numpy(), spec, shift).dequantize()
        ok = np.abs(got - want) <= 1e-6 * max(1.0, float(np.abs(want).max()))
        if spec.kind == "elastic" and spec.bits == 1 and spec.signed:
            xs = x.numpy() - (np.float32(shift) if shift is not None else 0)
            ok |= xs == 0  # sign(0) = 0 has no 1-bit code (PackedLinearNP corrects the product)
        assert ok.all(), (seed, got[~ok][:4], want[~ok][:4])


def _random_layer(rng, packing: Packing, n: int, k: int):
    values = (-1, 0, 1) if packing.is_ternary else (-1, 1)
    q = rng.choice(np.array(values, np.int8), size=(n, k))
    return q, pack(q, packing), rng.uniform(0.2, 2.0, n).astype(np.float32), \
        rng.normal(size=n).astype(np.float32)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[2], SPECS[5], SPECS[6], SPECS[7],
                                  SPECS[8], SPECS[9]],
                         ids=lambda s: f"{s.kind}{s.bits}-{s.signed}-{s.variant}")
@pytest.mark.parametrize("m", [1, 9])  # GEMV and GEMM
def test_packed_linear_np_matches_float64(backend, spec, m):
    rng = np.random.default_rng(m)
    packing = Packing.TERNARY_2BIT if spec.bits in (2, 8) else Packing.BINARY_1BIT
    n, k = 19, 70  # K not a multiple of 4, 8 or 256
    q, packed, alpha, bias = _random_layer(rng, packing, n, k)
    x = rng.normal(size=(2, m, k)).astype(np.float32)  # (B, T, K): one tensor
    if not spec.signed:
        x = np.abs(x)
    lin = PackedLinearNP(packed, k, alpha, bias, packing, spec, backend)
    y = lin(x)
    assert y.shape == (2, m, n) and y.dtype == np.float32
    xq = quantize_activation(x.reshape(-1, k), spec).dequantize().astype(np.float64)
    if spec.kind == "elastic" and spec.bits == 1 and spec.signed:
        shift = x.mean(dtype=np.float32) if spec.needs_mean else 0
        xq[(x.reshape(-1, k) - np.float32(shift)) == 0] = 0
    want = (xq @ (q.astype(np.float64) * alpha[:, None]).T + bias).reshape(2, m, n)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_errors():
    rng = np.random.default_rng(0)
    _, packed, alpha, _ = _random_layer(rng, Packing.TERNARY_2BIT, 4, 8)
    with pytest.raises(ValueError, match="float activations"):
        PackedLinearNP(packed, 8, alpha, None, "ternary_2bit", None)
    with pytest.raises(ValueError, match="no runtime quantizer"):
        PackedLinearNP(packed, 8, alpha, None, "ternary_2bit",
                       ActSpec("elastic", 4, True, variant="paper", alpha=1.0))
    with pytest.raises(ValueError, match="no kernel"):  # ternary x binary: no such kernel
        PackedLinearNP(packed, 8, alpha, None, "ternary_2bit", SPECS[6])
    lin = PackedLinearNP(packed, 8, alpha, None, "ternary_2bit", SPECS[0])
    with pytest.raises(ValueError, match="in_features=8"):
        lin(np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="needs clip"):
        ActSpec("minmax", 8, True)
    with pytest.raises(ValueError, match="signed"):
        ActSpec("absmax-token", 8, False)


NO_TORCH = r"""
import sys, json
sys.modules['torch'] = None
import numpy as np
from tbt.runtime.linear import PackedLinearNP
args = json.loads(sys.argv[1])
data = np.load(args['npz'])
out = {}
for name in args['layers']:
    lin = PackedLinearNP.from_packed_dir(args['dir'], name)
    y = lin(data[name + ':x'])
    ref = data[name + ':y']
    out[name] = float(np.abs(y - ref).max() / np.abs(ref).max())
try:
    PackedLinearNP.from_packed_dir(args['dir'], 'no.such.layer')
except KeyError as e:
    out['missing'] = 'not a packed linear layer' in str(e)
assert not [m for m in sys.modules if m.startswith('torch.')]
print(json.dumps(out))
"""


@pytest.mark.parametrize("bits", ["2-2-8", "2-2-2"])
def test_from_packed_dir_without_torch(tmp_path, bits):
    """The torch-free layer reproduces the torch PackedLinear on the inputs it saw."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from conftest import make_tiny

    from tbt.config import QuantConfig
    from tbt.export.io import load_packed, save_packed
    from tbt.quant.surgery import quantize_model

    m = make_tiny("bart")
    quantize_model(m, QuantConfig(bits=bits))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    m.train()
    with torch.no_grad():
        m(input_ids=ids, decoder_input_ids=ids[:, :4])
    d = save_packed(m.eval(), tmp_path / "ck")
    loaded = load_packed(d, backend="torch")
    names = ["model.encoder.layers.0.self_attn.q_proj", "model.encoder.layers.1.fc2",
             "model.decoder.layers.0.encoder_attn.k_proj"]
    arrays: dict[str, np.ndarray] = {}
    hooks = [loaded.get_submodule(n).register_forward_hook(
        lambda mod, a, o, n=n: arrays.update({n + ":x": a[0].numpy().copy(),
                                              n + ":y": o.numpy().copy()})) for n in names]
    with torch.no_grad():
        loaded(input_ids=ids, decoder_input_ids=ids[:, :4])
    for h in hooks:
        h.remove()
    np.savez(tmp_path / "io.npz", **arrays)
    args = json.dumps({"dir": str(d), "npz": str(tmp_path / "io.npz"), "layers": names})
    out = subprocess.run([sys.executable, "-c", NO_TORCH, args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res.pop("missing") is True
    # same float32 input: same codes; only the kernel's float rescale differs (~1 rounding).
    # 2-bit paper inputs are centred by numpy's mean here (torch's in the model): an ulp of
    # difference there moves a code only at an exact rounding boundary (random inputs: never)
    assert all(v < 2e-6 for v in res.values()), res
