"""OFF, attention-score MSE and attention-relation KL: hand-worked values, float64 loops written
from docs/related.md §4a/§6b/§10, masking, the attention capture, and short training runs.

Tolerance: the losses compute in float32 from float32 inputs; the float64 references agree to
1e-5 relative (softmax/log over at most a few hundred float32 terms).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_tiny
from tbt.distill.capture import capture_attention, stack_of
from tbt.distill.losses import (
    attention_relation_kl,
    attention_score_mse,
    feature_cosine,
    relation_logits,
)

RTOL = 1e-5


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- OFF: 1 - cos ------------------------------------------------------------------------------

def test_off_hand_worked_and_masked():
    # position 0: s=(1,0), t=(1,1): cos = 1/√2;  position 1: s=(1,2), t=(-2,1): cos = 0
    s = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])
    t = torch.tensor([[[1.0, 1.0], [-2.0, 1.0]]])
    p0, p1 = 1 - 1 / math.sqrt(2), 1.0
    assert feature_cosine(s, t).item() == pytest.approx((p0 + p1) / 2, rel=1e-6)
    assert feature_cosine(s, t, mask=torch.tensor([[1, 0]])).item() == pytest.approx(p0, rel=1e-6)
    assert feature_cosine(s, t, mask=torch.zeros(1, 2)).item() == 0.0
    # scale invariance (the point of OFF): an outlier-scaled copy costs nothing
    assert feature_cosine(s * 1000, s).item() == pytest.approx(0.0, abs=1e-6)
    # a zero vector gives cos 0 (loss 1), not NaN
    z = torch.zeros(1, 1, 2)
    assert feature_cosine(z, torch.ones(1, 1, 2)).item() == 1.0


@pytest.mark.parametrize("masked", [False, True])
def test_off_matches_float64(masked):
    s = torch.randn(3, 6, 10, generator=gen(0))
    t = torch.randn(3, 6, 10, generator=gen(1)) + 0.5 * s
    mask = torch.rand(3, 6, generator=gen(2)) > 0.4 if masked else None
    vals = []
    for b in range(3):
        for i in range(6):
            if mask is not None and not mask[b, i]:
                continue
            x, y = s[b, i].double().tolist(), t[b, i].double().tolist()
            dot = sum(a * c for a, c in zip(x, y))
            norm = math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(c * c for c in y))
            vals.append(1 - dot / norm)
    assert feature_cosine(s, t, mask).item() == pytest.approx(sum(vals) / len(vals), rel=RTOL)


def test_off_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="equal width"):
        feature_cosine(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


# ---- attention-score MSE -----------------------------------------------------------------------

def test_score_mse_hand_worked_with_causal_pair_mask():
    # one head, 2x2 scores; causal mask keeps (0,0), (1,0), (1,1): diffs 1, 2, 3 -> (1+4+9)/3
    s = torch.tensor([[[[1.0, 100.0], [2.0, 3.0]]]])
    t = torch.zeros(1, 1, 2, 2)
    causal = torch.tensor([[[[True, False], [True, True]]]])
    assert attention_score_mse(s, t, pair_mask=causal).item() == pytest.approx(14 / 3, rel=1e-6)
    # no masks: TernaryBERT's additive mask cancels, every pair counts
    assert attention_score_mse(s, t).item() == pytest.approx((1 + 1e4 + 4 + 9) / 4, rel=1e-6)
    # key 1 padded as well: only (0,0), (1,0)
    assert attention_score_mse(s, t, key_mask=torch.tensor([[1, 0]]), pair_mask=causal).item() \
        == pytest.approx(5 / 2, rel=1e-6)


def test_score_mse_matches_float64_with_all_masks():
    b, h, tq, tk = 2, 3, 4, 5
    s = torch.randn(b, h, tq, tk, generator=gen(3)) * 4
    t = torch.randn(b, h, tq, tk, generator=gen(4)) * 4
    qm = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    km = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    pm = torch.rand(b, 1, tq, tk, generator=gen(5)) > 0.3
    num = den = 0.0
    for i in range(b):
        for j in range(h):
            for q in range(tq):
                for k in range(tk):
                    if qm[i, q] and km[i, k] and pm[i, 0, q, k]:
                        num += (float(s[i, j, q, k]) - float(t[i, j, q, k])) ** 2
                        den += 1
    assert attention_score_mse(s, t, qm, km, pm).item() == pytest.approx(num / den, rel=RTOL)
    # an inf where the mask is closed must not leak into the result
    s2 = s.clone()
    s2[~pm.expand(b, h, tq, tk)] = float("inf")
    assert attention_score_mse(s2, t, qm, km, pm).item() == pytest.approx(num / den, rel=RTOL)
    with pytest.raises(ValueError, match="pair_mask"):
        attention_score_mse(s, t, pair_mask=pm[:, :, :2])


# ---- attention relations -----------------------------------------------------------------------

def ref_relation(x, heads):
    """float64 loops: concatenate the heads per position, split into `heads` groups, X Xᵀ/√d_r."""
    b, h, t, d = x.shape
    feats = [[[float(x[i, hh, p, dd]) for hh in range(h) for dd in range(d)] for p in range(t)]
             for i in range(b)]
    d_r = h * d // heads
    out = torch.zeros(b, heads, t, t, dtype=torch.float64)
    for i in range(b):
        for a in range(heads):
            for p in range(t):
                for q in range(t):
                    u = feats[i][p][a * d_r:(a + 1) * d_r]
                    v = feats[i][q][a * d_r:(a + 1) * d_r]
                    out[i, a, p, q] = sum(m * n for m, n in zip(u, v)) / math.sqrt(d_r)
    return out


def ref_relation_kl(s, t, heads, mask):
    ls, lt = ref_relation(s, heads), ref_relation(t, heads)
    b, a, n, _ = ls.shape
    rows = []
    for i in range(b):
        keys = [k for k in range(n) if mask is None or mask[i, k]]
        for hh in range(a):
            for q in keys:
                zs = math.log(sum(math.exp(ls[i, hh, q, k]) for k in keys))
                zt = math.log(sum(math.exp(lt[i, hh, q, k]) for k in keys))
                rows.append(sum(math.exp(lt[i, hh, q, k] - zt)
                                * ((lt[i, hh, q, k] - zt) - (ls[i, hh, q, k] - zs)) for k in keys))
    return float(sum(rows) / len(rows))  # a plain float: pytest.approx refuses 0-d tensors


def test_relation_logits_regroup_heads():
    x = torch.randn(2, 4, 3, 6, generator=gen(6))
    for heads in (None, 2, 8, 1):
        ref = ref_relation(x, 4 if heads is None else heads)
        torch.testing.assert_close(relation_logits(x, heads).double(), ref, rtol=RTOL, atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        relation_logits(x, 5)


@pytest.mark.parametrize("masked", [False, True])
def test_relation_kl_matches_float64(masked):
    s = torch.randn(2, 4, 5, 6, generator=gen(7))
    t = torch.randn(2, 4, 5, 6, generator=gen(8))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]) if masked else None
    got = attention_relation_kl(s, t, heads=2, query_mask=mask, key_mask=mask).item()
    assert got == pytest.approx(ref_relation_kl(s, t, 2, mask), rel=RTOL)


def test_relation_kl_zero_for_equal_relations_and_different_widths():
    t = torch.randn(1, 4, 5, 6, generator=gen(9))
    assert attention_relation_kl(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    # an orthogonal rotation of the features keeps X Xᵀ: a student of another basis matches
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen(10)))
    rotated = (t.transpose(1, 2).reshape(1, 5, 24) @ q).reshape(1, 5, 4, 6).transpose(1, 2)
    assert attention_relation_kl(rotated, t, heads=1).item() == pytest.approx(0.0, abs=1e-5)
    # student 2 heads x 4, teacher 4 heads x 6: relation heads 2 divide 8 and 24
    s = torch.randn(1, 2, 5, 4, generator=gen(11))
    got = attention_relation_kl(s, t, heads=2).item()
    assert got == pytest.approx(ref_relation_kl(s, t, 2, None), rel=RTOL)
    with pytest.raises(ValueError, match="relation_heads"):
        attention_relation_kl(s, t)


def test_relation_kl_gradient_matches_finite_differences():
    s = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=gen(12), requires_grad=True)
    t = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=gen(13))
    m = torch.tensor([[1, 1, 1, 0]])
    assert torch.autograd.gradcheck(
        lambda x: attention_relation_kl(x, t, query_mask=m, key_mask=m), (s,))


# ---- capture -----------------------------------------------------------------------------------

def test_stack_names():
    assert stack_of("model.encoder.layers.0.self_attn") == "encoder"
    assert stack_of("model.decoder.layers.1.encoder_attn") == "cross"
    assert stack_of("model.decoder.layers.1.self_attn") == "decoder"
    assert stack_of("encoder.block.0.layer.0.SelfAttention") == "encoder"
    assert stack_of("decoder.block.0.layer.1.EncDecAttention") == "cross"
    assert stack_of("transformer.h.0.attn") == "decoder"


def _batch(seq2seq: bool):
    ids = torch.randint(3, 100, (2, 7), generator=gen(14))
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, 5:] = 0
    labels = torch.randint(3, 100, (2, 5), generator=gen(15)) if seq2seq else ids.clone()
    if seq2seq:
        labels[1, 4:] = -100
    else:
        labels[am == 0] = -100
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def test_capture_bart_records_every_layer_and_the_scores_softmax_sees():
    from tbt.quant.attention import register_attention

    model = make_tiny("bart").eval()
    batch = _batch(True)
    with pytest.raises(ValueError, match="tbt_eager"):  # eager attention reports nothing
        with capture_attention(model.set_attn_implementation("eager") or model):
            model(**batch)
    model.set_attn_implementation(register_attention())
    with capture_attention(model) as cap:
        out = model(**batch, output_attentions=True)
    assert [len(cap[k]) for k in ("encoder", "decoder", "cross")] == [2, 2, 2]
    assert not any(hasattr(m, "tbt_record") for m in model.modules())  # detached again
    for stack, probs in (("encoder", out.encoder_attentions), ("decoder", out.decoder_attentions),
                         ("cross", out.cross_attentions)):
        for rec, p in zip(cap[stack], probs):
            d = rec.query.shape[-1]
            torch.testing.assert_close(rec.scores, rec.query @ rec.key.transpose(-1, -2) / d ** 0.5)
            masked = rec.scores.masked_fill(~rec.allowed, float("-inf"))
            torch.testing.assert_close(torch.softmax(masked, -1), p)
    dec = cap["decoder"][0].allowed  # causal
    assert torch.equal(dec[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    enc = cap["encoder"][0].allowed  # key padding of example 1
    assert enc[1, 0, :, 5:].logical_not().all() and enc[1, 0, :, :5].all()


# ---- a few training steps with each term alone --------------------------------------------------

FAMILIES = {"bart": True, "gpt2": False, "llama": False}


@pytest.mark.parametrize("term", ["off", "attn_scores", "relation"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_term_alone_trains_a_ternary_student(family, term):
    from tbt.quant.attention import register_attention
    from tbt.quant.surgery import quantize_model
    from tbt.train.config import DistillConfig
    from tbt.train.objective import distill_forward, total_loss

    seq2seq = FAMILIES[family]
    teacher = make_tiny(family, seed=1).eval().requires_grad_(False)
    with torch.no_grad():  # a teacher with larger features than the random student's 0.02 init
        for name, p in teacher.named_parameters():
            if p.dim() == 2 and not any(k in name for k in ("emb", "wte", "wpe", "shared")):
                p.mul_(5.0)
    teacher.set_attn_implementation(register_attention())
    torch.manual_seed(2)
    student = quantize_model(make_tiny(family, seed=3), "2-2-8")  # a different random start
    weights = dict(w_ce=0.0, w_logits=0.0, w_hidden=0.0, w_attn=0.0)
    weights["w_" + term] = 1.0
    dcfg = DistillConfig(**weights, relation_layers=None)
    batch = _batch(seq2seq)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        terms = distill_forward(student, teacher, batch, dcfg, seq2seq)
        assert set(terms) == {"ce", term}
        loss = total_loss(terms, dcfg)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-2:]) < 0.8 * losses[0], losses


def test_distill_config_new_terms_validate_and_round_trip():
    from tbt.train.config import DistillConfig, TrainConfig

    d = DistillConfig(w_off=0.5, w_attn_scores=1, w_relation=2, relation_layers="0,-1",
                      relation_heads=4)
    assert d.relation_layers == (0, -1) and d.needs_teacher and d.needs_capture
    assert DistillConfig(relation_layers="all").relation_layers is None
    assert not DistillConfig(w_logits=0, w_hidden=0, w_attn=0).needs_teacher
    assert DistillConfig(w_logits=0, w_hidden=0, w_attn=0, w_off=1).needs_teacher
    cfg = TrainConfig.from_flat({"model": "gpt2-tiny", "output_dir": "o", "max_steps": 1,
                                 "w_relation": 1.0, "relation_layers": [-1, 1],
                                 "relation_heads": 2, "w_off": 0.1})
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    for bad, match in ((dict(w_off=-1), "w_off"), (dict(relation_heads=0), "relation_heads"),
                       (dict(relation_layers=""), "relation_layers"),
                       (dict(relation_layers="x"), "relation_layers")):
        with pytest.raises(ValueError, match=match):
            DistillConfig(**bad)
