"""QuantLinear / QuantEmbedding / quantized attention against their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbt.quant.activation import ElasticQuantizer
from tbt.quant.attention import AttentionQuantizers, tbt_attention_forward
from tbt.quant.modules import QuantEmbedding, QuantLinear, WeightSpec
from tbt.quant.weight import dequantize, weight_codes


@pytest.mark.parametrize("method,bits", [("tbt", 2), ("tbt", 1), ("twn", 2), ("absmean", 2)])
@pytest.mark.parametrize("variant", ["paper", "released"])
def test_quant_linear_equals_codes_times_scale(method, bits, variant):
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    spec = WeightSpec(bits, method, variant)
    act = ElasticQuantizer(2, signed=True, variant=variant)
    q = QuantLinear.from_float(lin, spec, act)
    assert q.weight is lin.weight and q.bias is lin.bias  # shares, never copies
    x = torch.randn(3, 5, 24)
    q.train()
    q(x)  # first batch initialises α
    q.eval()
    codes, scale = weight_codes(lin.weight.detach(), bits, method=method, variant=variant)
    expected = F.linear(act(x), dequantize(codes, scale, torch.float32), lin.bias)
    assert torch.equal(q(x), expected)


def test_conv1d_layout_quantizes_per_output_channel():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=10, nx=24)  # weight (24, 10)
    nn.init.normal_(conv.weight, std=0.02)
    spec = WeightSpec(2, "tbt", "released")
    q = QuantLinear.from_float(conv, spec, None)
    assert q.transposed and q.weight.shape == (24, 10)
    x = torch.randn(4, 24)
    codes, scale = weight_codes(conv.weight.detach().t(), 2, method="tbt", variant="released")
    assert scale.shape == (10, 1)
    assert torch.equal(q(x), F.linear(x, dequantize(codes, scale, torch.float32), conv.bias))


@pytest.mark.parametrize("method", ["tbt", "bwn", "absmean"])
def test_embedding_row_gather_equals_full_matrix(method):
    torch.manual_seed(0)
    bits = 1 if method == "bwn" else 2
    emb = nn.Embedding(50, 16, padding_idx=1)
    q = QuantEmbedding.from_float(emb, WeightSpec(bits, method, "paper"))
    ids = torch.tensor([[3, 4, 1, 49], [7, 7, 0, 2]])
    full = F.embedding(ids, q.quantized_weight(), padding_idx=1)
    out = q(ids)
    assert torch.equal(out, full)
    out.sum().backward()
    g_lookup = emb.weight.grad.clone()
    emb.weight.grad = None
    full = F.embedding(ids, q.quantized_weight(), padding_idx=1)
    full.sum().backward()
    assert torch.equal(g_lookup, emb.weight.grad)


def _manual_attention(q, k, v, mask, quant, scaling):
    """Float64 re-implementation of docs/numerics.md §2a's quantized attention."""
    qq = quant.query(q * scaling).double()
    kq = quant.key(k).double()
    vq = quant.value(v).double()
    s = qq @ kq.transpose(-1, -2) + mask.double()
    p = torch.softmax(s, -1)
    pq = quant.probs(p.float()).double()
    return (pq @ vq).transpose(1, 2), p


def test_attention_function_matches_manual():
    torch.manual_seed(0)
    mod = nn.Module()
    mod.training = False
    mk = lambda s: ElasticQuantizer(2, signed=s, variant="released")  # noqa: E731
    mod.tbt_attn = AttentionQuantizers(mk(True), mk(True), mk(True), mk(False))
    for m in mod.tbt_attn.modules():
        if isinstance(m, ElasticQuantizer):
            with torch.no_grad():
                m.alpha.fill_(0.3)
            m.initialized.fill_(True)
            m._initialized = True
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, :, :, -2:] = torch.finfo(torch.float32).min
    out, probs = tbt_attention_forward(mod, q, k, v, mask, scaling=8 ** -0.5)
    ref_out, ref_p = _manual_attention(q, k, v, mask, mod.tbt_attn, 8 ** -0.5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.double(), ref_p, rtol=1e-5, atol=1e-6)  # FP probs returned


def test_attention_without_quantizers_is_eager():
    from transformers.models.bart.modeling_bart import eager_attention_forward

    torch.manual_seed(0)
    mod = nn.Module()
    mod.training = False
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    out, p = tbt_attention_forward(mod, q, k, v, None, scaling=0.25)
    ref_out, ref_p = eager_attention_forward(mod, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(p, ref_p)
