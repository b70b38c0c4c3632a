"""GGUF export: read the file back with the ``gguf`` package and check every weight against
tbt's codes and scales (``docs/gguf.md``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

HIDDEN, FFN, HEADS, KV, VOCAB = 256, 320, 4, 2, 300  # FFN 320: down_proj rows fall back


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(base + ["ab", "abc"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    return tok


def _model(bits="2-2-8", head="fp", seed=0, family="llama"):
    import transformers as tf

    from tbt import QuantConfig, quantize_model

    torch.manual_seed(seed)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    cfg = cls[0](vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                 num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV,
                 max_position_embeddings=64, tie_word_embeddings=True,
                 rope_theta=50000.0, rms_norm_eps=1e-5)
    model = cls[1](cfg)
    with torch.no_grad():  # norms and biases away from 1 and 0 so a mix-up shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    qcfg = QuantConfig(bits=bits, skip_modules=() if head == "packed" else ("lm_head",))
    quantize_model(model, qcfg).train()
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (2, 12), generator=torch.Generator()
                                      .manual_seed(1)))
    return model.eval()


def _read(path):
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    return r, tensors


def _deq(t) -> np.ndarray:
    """The tensor as float32 ``(rows, row length)``, decoded by the gguf package."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def _tbt_values(mod) -> np.ndarray:
    """``fp16(α_r) · q`` from the packed module's own codes and scales (float64 product)."""
    from tbt.inference.packed import unpack_codes

    q = unpack_codes(mod.packed, mod.packing, mod.k).numpy().astype(np.float64)
    a16 = mod.scale.numpy().astype(np.float16).astype(np.float64)
    return (q * a16[:, None]).astype(np.float32)


def _rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Source row of each GGUF row of a q/k matrix, spelled out: within each head the GGUF row
    ``2i`` is transformers' row ``i`` and ``2i + 1`` is row ``hd/2 + i``."""
    hd = n_rows // n_head
    src = np.empty(n_rows, dtype=np.int64)
    for h in range(n_head):
        for i in range(hd // 2):
            src[h * hd + 2 * i] = h * hd + i
            src[h * hd + 2 * i + 1] = h * hd + hd // 2 + i
    return src


def _names(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    b = f"blk.{layer}."
    return {p + "self_attn.q_proj": b + "attn_q.weight",
            p + "self_attn.k_proj": b + "attn_k.weight",
            p + "self_attn.v_proj": b + "attn_v.weight",
            p + "self_attn.o_proj": b + "attn_output.weight",
            p + "mlp.gate_proj": b + "ffn_gate.weight", p + "mlp.up_proj": b + "ffn_up.weight",
            p + "mlp.down_proj": b + "ffn_down.weight",
            p + "input_layernorm": b + "attn_norm.weight",
            p + "post_attention_layernorm": b + "ffn_norm.weight"}


@pytest.mark.parametrize("ternary_type,fallback", [("tq2_0", "q4_0"), ("tq1_0", "q8_0"),
                                                   ("tq2_0", "f16")])
def test_weights_read_back_exactly(tmp_path, ternary_type, fallback):
    from tbt.export.convert import convert_model
    from tbt.inference.packed import PackedEmbedding, PackedLinear
    from tbt.export.gguf_writer import export_gguf

    model = _model()
    res = export_gguf(model, tmp_path / "m.gguf", _tokenizer(), ternary_type=ternary_type,
                      fallback=fallback)
    conv = convert_model(__import__("copy").deepcopy(model))
    _, tensors = _read(tmp_path / "m.gguf")
    mapping = {"model.embed_tokens": "token_embd.weight", "model.norm": "output_norm.weight",
               "lm_head": "output.weight"}
    for layer in range(2):
        mapping |= _names(layer)
    assert set(tensors) == set(mapping.values())
    checked = 0
    for src, name in mapping.items():
        mod = conv.get_submodule(src)
        t = tensors[name]
        got = _deq(t)
        if isinstance(mod, (PackedLinear, PackedEmbedding)):
            want = _tbt_values(mod)
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                want = want[_rope_rows(want.shape[0], HEADS if "attn_q" in name else KV)]
            k = want.shape[1]
            expect_type = ternary_type if k % 256 == 0 else fallback
            assert t.tensor_type.name == expect_type.upper(), name
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=name)
            checked += 1
        elif src == "lm_head":  # TBT's FP head tied to the latent embedding: F16 of it
            want = mod.weight.detach().numpy().astype(np.float16).astype(np.float32)
            assert t.tensor_type.name == "F16"
            np.testing.assert_array_equal(got.reshape(want.shape), want)
        else:  # RMSNorm weights: F32, exact
            assert t.tensor_type.name == "F32"
            np.testing.assert_array_equal(got.reshape(-1), mod.weight.detach().numpy())
    assert checked == 15  # the embedding and 7 projections x 2 layers
    # the report: which matrices fell back and why, and the float16 scale rounding
    fb = {t.name for t in res.tensors if t.reason.startswith("fallback")}
    assert fb == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert all("320 is not a multiple of 256" in t.reason for t in res.tensors if t.name in fb)
    assert fallback.upper() in res.summary() and "ffn_down" in res.summary()


def test_scale_rounding_is_reported_and_bounded(tmp_path):
    from tbt.export.convert import convert_model
    from tbt.export.gguf_writer import export_gguf, fp16_scale_error

    model = _model()
    res = export_gguf(model, tmp_path / "m.gguf", _tokenizer())
    conv = convert_model(__import__("copy").deepcopy(model))
    info = {t.source: t for t in res.tensors}
    for src in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        a = conv.get_submodule(src).scale.numpy().astype(np.float64)
        rel = np.abs(a.astype(np.float16).astype(np.float64) - a) / a
        assert info[src].scale_rel_err == pytest.approx(rel.max(), rel=1e-6)
        assert 0 < rel.max() <= 2.0 ** -11  # round to nearest, 11 significant bits
    # a scale that float16 holds exactly (a power of two, a short mantissa) has no error
    assert fp16_scale_error(np.array([0.25, 0.375, -1.5], np.float32)) == 0.0


def test_binary_codes_and_tied_packed_head(tmp_path):
    from tbt.export.convert import convert_model
    from tbt.export.gguf_writer import export_gguf

    model = _model(bits="1-1-8", head="packed")
    res = export_gguf(model, tmp_path / "m.gguf", _tokenizer())
    _, tensors = _read(tmp_path / "m.gguf")
    assert "output.weight" not in tensors  # the head shares the embedding's codes
    assert any("tied to the token embedding" in n for n in res.notes)
    conv = convert_model(__import__("copy").deepcopy(model))
    emb = conv.get_submodule("model.embed_tokens")
    got = _deq(tensors["token_embd.weight"]).reshape(VOCAB, HIDDEN)
    want = _tbt_values(emb)
    assert set(np.unique(np.sign(want))) <= {-1.0, 1.0}
    np.testing.assert_array_equal(got, want)


def test_metadata_and_tokenizer(tmp_path):
    from tbt.export.gguf_writer import export_gguf

    tok = _tokenizer()
    export_gguf(_model(), tmp_path / "m.gguf", tok, tokenizer_pre="smollm")
    r, _ = _read(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"],
            f["llama.feed_forward_length"]) == (2, HIDDEN, FFN)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (HEADS, KV)
    assert f["llama.rope.dimension_count"] == HIDDEN // HEADS
    assert f["llama.rope.freq_base"] == pytest.approx(50000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB
    for text, i in tok.get_vocab().items():
        assert tokens[i] == text
    assert f["tokenizer.ggml.merges"] == ["a b", "ab c"]
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.convert_tokens_to_ids("<s>")] == int(gguf.TokenType.CONTROL)
    assert types[0] == int(gguf.TokenType.NORMAL) and types[VOCAB - 1] == int(
        gguf.TokenType.UNUSED)
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert json.loads(f["tbt.quant_config"])["bits"] == "2-2-8"


@pytest.mark.parametrize("bits,note", [("2-2-8", "8-bit activation quantizer is not in the"),
                                       ("2-2-2", "trained with 2-bit activations")])
def test_activation_note(tmp_path, bits, note):
    from tbt.export.gguf_writer import export_gguf

    res = export_gguf(_model(bits=bits), tmp_path / "m.gguf", _tokenizer())
    assert any(note in n for n in res.notes)
    assert note in res.summary()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_transformers_reads_the_file_back(tmp_path, family):
    """transformers' own GGUF reader (its inverse q/k permutation, names and hyper-parameters)
    rebuilds a float model whose logits equal the same architecture built directly from
    fp16(α)·q (Qwen2: with its q/k/v biases; no permutation)."""
    import copy

    import transformers as tf

    from tbt.export.convert import convert_model
    from tbt.inference.packed import PackedEmbedding, PackedLinear
    from tbt.export.gguf_writer import export_gguf

    model = _model(family=family)
    export_gguf(model, tmp_path / "m.gguf", _tokenizer())
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                   dtype=torch.float32).eval()
    conv = convert_model(copy.deepcopy(model))
    ref = type(model)(model.config).eval()
    with torch.no_grad():
        for name, mod in conv.named_modules():
            if isinstance(mod, (PackedLinear, PackedEmbedding)):
                ref.get_submodule(name).weight.copy_(torch.from_numpy(_tbt_values(mod)))
                if getattr(mod, "bias", None) is not None:
                    ref.get_submodule(name).bias.copy_(mod.bias)
            elif name.endswith("norm"):
                ref.get_submodule(name).weight.copy_(mod.weight)
        ref.lm_head.weight = torch.nn.Parameter(
            conv.lm_head.weight.detach().half().float().clone())
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = back(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unsupported_model_and_missing_vocab(tmp_path):
    from conftest import make_tiny

    from tbt import QuantConfig, quantize_model
    from tbt.export.gguf_writer import GGUFExportError, export_gguf

    bart = quantize_model(make_tiny("bart"), QuantConfig(bits="2-2-8"))
    with pytest.raises(GGUFExportError, match="decoder-only"):
        export_gguf(bart, tmp_path / "b.gguf", _tokenizer())
    with pytest.raises(GGUFExportError, match="--vocab-from"):
        export_gguf(_model(), tmp_path / "m.gguf", None)
    assert not list(tmp_path.iterdir())  # nothing half-written


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tbt", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_gguf_and_summary(tmp_path):
    from conftest import make_tiny

    from tbt import QuantConfig, quantize_model

    model = _model()
    model.save_pretrained(tmp_path / "trained")
    _tokenizer().save_pretrained(tmp_path / "trained")
    proc = _cli("export", "--model", str(tmp_path / "trained"), "--output-dir",
                str(tmp_path / "out"), "--format", "gguf", "--gguf-fallback", "q8_0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "blk.0.ffn_down.weight" in proc.stdout and "Q8_0" in proc.stdout
    assert "fell back" in (tmp_path / "out" / "gguf_summary.md").read_text()
    _, tensors = _read(tmp_path / "out" / "model.gguf")
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.1.ffn_up.weight"].tensor_type.name == "TQ2_0"

    bart = quantize_model(make_tiny("bart"), QuantConfig(bits="2-2-8"))
    bart.save_pretrained(tmp_path / "bart")
    proc = _cli("export", "--model", str(tmp_path / "bart"), "--output-dir",
                str(tmp_path / "o2"), "--format", "gguf")
    assert proc.returncode == 2 and "decoder-only" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_float_model_is_written_in_f16(tmp_path):
    """A model tbt did not quantize: every matrix F16 of its weight (the path that
    benchmarks/gguf_llamacpp_check.py --bits fp runs through llama.cpp)."""
    import transformers as tf

    from tbt.export.gguf_writer import export_gguf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    res = export_gguf(model, tmp_path / "m.gguf", _tokenizer())
    _, tensors = _read(tmp_path / "m.gguf")
    assert "output.weight" not in tensors  # tied to the float embedding
    assert not any(t.reason.startswith("fallback") for t in res.tensors)
    w = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == "F16"
    np.testing.assert_array_equal(_deq(t).reshape(w.shape),
                                  w.astype(np.float16).astype(np.float32))
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(_deq(tensors["blk.0.attn_q.weight"]).reshape(q.shape),
                                  q[_rope_rows(64, 4)].astype(np.float16).astype(np.float32))
