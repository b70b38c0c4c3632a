"""quantize_model on every supported family: forward, backward, generate, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import CAUSAL, SEQ2SEQ, VOCAB, make_tiny

from tbt import QuantConfig, quantize_model
from tbt.quant.activation import ElasticQuantizer, MinMaxQuantizer
from tbt.quant.modules import QuantEmbedding, QuantLinear

pytest.importorskip("transformers")


def batch_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # one padded row
    if model.config.is_encoder_decoder:
        labels = torch.randint(3, VOCAB, (2, 7), generator=g)
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _alphas(model):
    return [m.alpha for m in model.modules() if isinstance(m, ElasticQuantizer)]


@pytest.mark.parametrize("family", SEQ2SEQ + CAUSAL)
@pytest.mark.parametrize("bits", ["2-2-2", "1-1-8"])
def test_forward_backward_every_family(family, bits):
    model = make_tiny(family)
    quantize_model(model, QuantConfig(bits=bits))
    n_lin = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_lin >= 2 * 4  # at least q/k/v/o per layer
    assert any(isinstance(m, QuantEmbedding) for m in model.modules())
    assert not isinstance(model.get_output_embeddings(), QuantLinear)  # lm_head skipped
    model.train()
    out = model(**batch_for(model))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and "position" not in name and "relative_attention_bias" not in name:
            assert p.grad is not None, f"no gradient reached {name}"
    alphas = _alphas(model)
    if bits.endswith("-2"):
        assert alphas, "2-bit activations must use learned-step quantizers"
        assert all(a.grad is not None and torch.isfinite(a.grad) for a in alphas)
        assert sum(bool(a.grad.abs() > 0) for a in alphas) > len(alphas) // 2
    else:
        assert any(isinstance(m, MinMaxQuantizer) for m in model.modules())


@pytest.mark.parametrize("family", SEQ2SEQ + CAUSAL)
def test_generate_beam_and_cache(family):
    model = make_tiny(family)
    quantize_model(model, QuantConfig(bits="2-2-2"))
    model.train()
    model(**batch_for(model))  # first training batch initialises every α
    model.eval()
    ids = batch_for(model)["input_ids"][:1]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    greedy_cache = model.generate(ids, num_beams=1, use_cache=True, **kw)
    greedy_nocache = model.generate(ids, num_beams=1, use_cache=False, **kw)
    beams = model.generate(ids, num_beams=3, use_cache=True, **kw)
    assert torch.equal(greedy_cache, greedy_nocache)  # the KV cache changes nothing
    assert beams.shape[0] == 1 and beams.shape[1] == greedy_cache.shape[1]


@pytest.mark.parametrize("family", ["bart", "t5", "gpt2", "llama"])
def test_save_load_round_trip(family, tmp_path):
    from tbt.hf import load_pretrained

    model = make_tiny(family)
    cfg = QuantConfig(bits="2-2-2", variant="released")
    quantize_model(model, cfg)
    model.train()
    b = batch_for(model)
    model(**b)  # initialise α
    model.eval()
    with torch.no_grad():
        ref = model(**b).logits
    model.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "tbt" and saved["bits"] == "2-2-2"
    assert saved["variant"] == "released"
    loaded, _ = load_pretrained(tmp_path)
    loaded.eval()
    assert loaded.config.quantization_config.to_quant_config() == cfg
    alphas = _alphas(loaded)
    assert alphas and all(float(a.detach()) != 1.0 for a in alphas)  # learned α came back
    assert all(m._initialized for m in loaded.modules() if isinstance(m, ElasticQuantizer))
    with torch.no_grad():
        got = loaded(**b).logits
    assert torch.equal(got, ref)


def test_tied_embedding_lookup_quantized_head_fp():
    """The released behaviour: lookups use the quantized matrix, logits the FP latent one."""
    from tbt.quant.weight import quantize_weight

    model = make_tiny("bart")
    quantize_model(model, QuantConfig(bits="2-2-fp", variant="released"))
    shared = model.get_input_embeddings()
    assert isinstance(shared, QuantEmbedding)
    assert model.model.encoder.embed_tokens.weight is shared.weight
    assert model.get_output_embeddings().weight is shared.weight  # tie kept: FP head
    ids = torch.tensor([[5, 6, 7]])
    q = quantize_weight(shared.weight.detach(), 2, method="tbt", variant="released")
    emb = model.model.encoder.embed_tokens(ids)
    scale = model.model.encoder.embed_tokens.embed_scale or 1.0
    assert torch.equal(emb, q[ids] * scale)


def test_unsigned_input_only_after_activation():
    model = make_tiny("bart")
    quantize_model(model, QuantConfig(bits="2-2-2"))
    layer = model.model.encoder.layers[0]
    assert layer.fc2.act_quant.signed is False
    assert layer.fc1.act_quant.signed is True and layer.self_attn.q_proj.act_quant.signed is True
    attn = layer.self_attn.tbt_attn
    assert attn.probs.signed is False and attn.query.signed is True
    llama = make_tiny("llama")
    quantize_model(llama, QuantConfig(bits="2-2-2"))
    assert llama.model.layers[0].mlp.down_proj.act_quant.signed is True  # gated MLP: signed


def test_skip_patterns_and_errors():
    model = make_tiny("bart")
    quantize_model(model, QuantConfig(bits="2-2-8", skip_modules=("lm_head", "*fc1")))
    assert not isinstance(model.model.encoder.layers[0].fc1, QuantLinear)
    assert isinstance(model.model.encoder.layers[0].fc2, QuantLinear)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, QuantConfig(bits="2-2-8"))


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_bf16_model_and_autocast(family):
    model = make_tiny(family)
    quantize_model(model, QuantConfig(bits="2-2-2"))
    b = batch_for(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**b).loss
    loss.backward()
    assert torch.isfinite(loss)
    half = make_tiny(family).to(torch.bfloat16)
    quantize_model(half, QuantConfig(bits="1-1-8"))
    out = half(**b)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in half.parameters()
               if p.dtype == torch.bfloat16)
