"""The native engine (tbt.runtime.engine) against the torch backend and the numpy reference.

Tiny random decoder-only models (Llama, Qwen2 with q/k/v biases, Mistral) in every E-W-A
setting the engine runs are quantized, their α initialised from one batch, saved packed, and
then decoded by ``load_packed(dir).generate`` (torch) and by the engine: the greedy tokens must
be equal, for batches of one and two prompts of several lengths and past 100+ cached steps.
"""

from __future__ import annotations

import copy
import ctypes
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from tbt.runtime.kernels import native  # noqa: E402

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")

VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2)


def _build(tmp, name: str, family: str, bits: str, head: str, variant: str = "paper",
           kv_gain: float = 1.0, **qkw):
    from tbt.config import QuantConfig
    from tbt.export.io import save_packed
    from tbt.quant.surgery import quantize_model

    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                          "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[family]
    extra = {"tie_word_embeddings": True} if family != "mistral" else {}
    fp = model_cls(cfg_cls(**SHAPE, **extra)).eval()
    if family == "qwen2":  # non-zero q/k/v biases, so that the engine must add them
        with torch.no_grad():
            for layer in fp.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.1)
    if kv_gain != 1.0:  # larger keys and values (past the attention quantizers' clip)
        with torch.no_grad():
            for layer in fp.model.layers:
                layer.self_attn.k_proj.weight.mul_(kv_gain)
                layer.self_attn.v_proj.weight.mul_(kv_gain)
    qcfg = QuantConfig(bits=bits, variant=variant,
                       skip_modules=() if head == "packed" else ("lm_head",), **qkw)
    m = quantize_model(copy.deepcopy(fp), qcfg).train()
    with torch.no_grad():
        m(input_ids=torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5)))
    m.eval()
    d = tmp / name
    save_packed(m, d, lm_head="int8" if head == "int8" else "fp")
    return d


CASES = [("llama", "2-2-8", "packed"), ("llama", "2-2-8", "fp"), ("llama", "1-1-8", "packed"),
         ("llama", "2-2-2", "packed"), ("llama", "1-1-1", "packed"), ("llama", "1-1-1", "fp"),
         ("qwen2", "2-2-8", "fp"), ("mistral", "2-2-2", "fp")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    out = {case: _build(tmp, "-".join(case), *case) for case in CASES}
    out[("llama", "2-2-2", "released")] = _build(tmp, "released", "llama", "2-2-2", "packed",
                                                 "released")
    out[("llama", "2-2-8", "int8")] = _build(tmp, "int8", "llama", "2-2-8", "int8")
    return out


def _torch_tokens(d, prompt: np.ndarray, n: int, backend: str = "auto") -> np.ndarray:
    from tbt.export.io import load_packed

    torch.set_num_threads(1)  # the engine reproduces torch's one-thread sums (engine.c)
    model = load_packed(d, backend=backend)
    src = torch.from_numpy(prompt)
    with torch.inference_mode():
        out = model.generate(input_ids=src, attention_mask=torch.ones_like(src),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, prompt.shape[1]:].numpy()


def _prompt(b: int, t: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, (b, t))


@pytest.mark.parametrize("case", CASES + [("llama", "2-2-2", "released")],
                         ids=lambda c: "-".join(c))
def test_greedy_tokens_equal_torch_backend(ckpts, case):
    from tbt.runtime.engine import Engine

    eng = Engine.from_packed_dir(ckpts[case])
    for b, t, seed in ((1, 1, 0), (1, 6, 1), (2, 5, 2), (1, 13, 3)):
        prompt = _prompt(b, t, seed)
        want = _torch_tokens(ckpts[case], prompt, 24)
        got = eng.generate(prompt, 24, min_new_tokens=24)[:, t:]
        np.testing.assert_array_equal(got, want, err_msg=f"batch {b}, prompt length {t}")


def _torch_padded(d, ids: np.ndarray, mask: np.ndarray, n: int):
    """torch's greedy tokens and per-step logits (B, n, V) on a padded batch."""
    from tbt.export.io import load_packed

    torch.set_num_threads(1)
    model = load_packed(d)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.from_numpy(ids),
                             attention_mask=torch.from_numpy(mask), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return (out.sequences[:, ids.shape[1]:].numpy(),
            np.stack([x.numpy() for x in out.logits], axis=1))


@pytest.mark.parametrize("case", CASES + [("llama", "2-2-2", "released")],
                         ids=lambda c: "-".join(c))
def test_padded_batch_of_unequal_prompts_equals_torch(ckpts, case):
    """Prompts of 3, 9 and 6 tokens, left-padded (with token 0) into one batch: the tokens and
    the logits of every step equal torch's generate on the same padded batch and attention mask
    (pad tokens in the per-tensor quantizer statistics, masked as keys, position ids from the
    first real token). Each prompt decoded alone, or the batch without its mask, gives other
    logits (the batch's quantizer statistics; the pad keys): the comparison can tell."""
    from tbt.runtime.engine import Engine

    rng = np.random.default_rng(21)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (3, 9, 6)]
    ids = np.zeros((3, 9), dtype=np.int64)
    mask = np.zeros((3, 9), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    want, want_logits = _torch_padded(ckpts[case], ids, mask, 20)
    eng = Engine.from_packed_dir(ckpts[case])
    got = eng.generate(prompts, 20, min_new_tokens=20, pad_token_id=0)
    np.testing.assert_array_equal(got[:, :9], ids)
    np.testing.assert_array_equal(got[:, 9:], want)

    def logits(prompt, **kw):
        steps = []
        list(eng.stream(prompt, 20, min_new_tokens=20, eos_token_id=None,
                        logits_hook=lambda x: steps.append(x.copy()), **kw))
        return np.stack(steps, axis=1)

    tol = 1e-5 * float(np.abs(want_logits).max())
    np.testing.assert_allclose(logits(ids, attention_mask=mask), want_logits, rtol=0, atol=tol)
    assert np.abs(logits(ids) - want_logits).max() > 100 * tol  # no mask: not torch's
    alone = logits(np.array([prompts[1]]))[0]  # the unpadded row, without the batch
    assert np.abs(alone - want_logits[1]).max() > 100 * tol


def test_padding_errors_are_clear(ckpts):
    from tbt.runtime.engine import Engine

    eng = Engine.from_packed_dir(ckpts[("llama", "2-2-8", "packed")])
    with pytest.raises(ValueError, match="left padding"):
        eng.generate([[5, 6, 7]], 2, attention_mask=[[1, 0, 1]])
    with pytest.raises(ValueError, match="left padding"):
        eng.generate([[5, 6, 7]], 2, attention_mask=[[0, 0, 0]])
    with pytest.raises(ValueError, match="at least one token"):
        eng.generate([[5, 6], []], 2)


def test_int8_head_equals_the_float_path(ckpts):
    """The int8 head runs as its dequantized matrix: the values of backend="torch"."""
    from tbt.runtime.engine import Engine

    d = ckpts[("llama", "2-2-8", "int8")]
    eng = Engine.from_packed_dir(d)
    assert eng.head_format == "int8"
    prompt = _prompt(1, 7, 4)
    np.testing.assert_array_equal(eng.generate(prompt, 16, min_new_tokens=16)[:, 7:],
                                  _torch_tokens(d, prompt, 16, backend="torch"))


@pytest.mark.parametrize("case", [("llama", "2-2-8", "packed"), ("llama", "2-2-2", "packed")],
                         ids=lambda c: "-".join(c))
def test_kv_cache_many_steps(ckpts, case):
    """120 decoding steps: the cache and its re-quantization stay equal to torch's."""
    from tbt.runtime.engine import Engine

    prompt = _prompt(1, 4, 7)
    want = _torch_tokens(ckpts[case], prompt, 120)
    got = Engine.from_packed_dir(ckpts[case]).generate(prompt, 120, min_new_tokens=120)[:, 4:]
    np.testing.assert_array_equal(got, want)


def test_kv_cache_held_once(ckpts, tmp_path):
    """What each K/V cache keeps (tbt_kv_mode). Min/max stops writing raw rows once its clipped
    range saturates (here in the prompt: keys and values scaled up past the clip); the raw
    rows after it stay untouched (NaN-filled here) and the tokens still equal torch's over 40
    steps. The released elastic quantizer (fixed parameters) keeps no raw cache; the paper's
    centred one shares one quantized scratch pair across the layers."""
    from tbt.runtime.engine import Engine

    d = _build(tmp_path, "clip", "llama", "2-2-8", "packed", kv_gain=300.0)
    prompt = _prompt(1, 6, 14)
    want = _torch_tokens(d, prompt, 40)
    eng = Engine.from_packed_dir(d)
    eng._allocate(1, 6 + 40)
    for kc, vc, _, _ in eng._caches:
        kc[...] = np.nan
        vc[...] = np.nan
    got = eng.generate(prompt, 40, min_new_tokens=40)[:, 6:]
    np.testing.assert_array_equal(got, want)
    assert all(st[3] == 1.0 and st[11] == 1.0 for st in eng._stats)  # K and V saturated
    for kc, vc, _, _ in eng._caches:  # raw rows: the prompt's only (saturated in it)
        assert not np.isnan(kc[0, :, :6]).any() and np.isnan(kc[0, :, 6:46]).all()
        assert np.isnan(vc[0, :, 6:46]).all()

    rel = Engine.from_packed_dir(ckpts[("llama", "2-2-2", "released")])
    rel.generate(prompt, 4)
    assert all(c[0] is None and c[1] is None for c in rel._caches)
    paper = Engine.from_packed_dir(ckpts[("llama", "2-2-2", "packed")])
    paper.generate(prompt, 4)
    assert all(c[2] is paper._caches[0][2] and c[3] is paper._caches[0][3] and
               c[0] is not paper._caches[0][0] for c in paper._caches[1:])


def test_logits_equal_numpy_reference(ckpts):
    """Step by step, the C engine's logits equal the numpy reference (engine_ref, the ref
    kernels) to float32 rounding, including a second sequence started after a first one."""
    from tbt.runtime.engine import Engine
    from tbt.runtime.engine_ref import EngineReference

    eng = Engine.from_packed_dir(ckpts[("llama", "2-2-8", "fp")])
    ref = EngineReference(eng)
    for prompt in (_prompt(2, 6, 8), _prompt(1, 3, 9)):
        eng.reset()
        ref.reset()
        a, b = eng.forward(prompt, reserve=12), ref.forward(prompt)
        for _ in range(12):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
            nxt = a.argmax(-1)[:, None]
            a, b = eng.forward(nxt), ref.forward(nxt)
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_sampling_reproducible_and_top_k_1_is_greedy(ckpts):
    from tbt.runtime.engine import Engine

    eng = Engine.from_packed_dir(ckpts[("llama", "2-2-8", "packed")])
    prompt = _prompt(1, 5, 11)
    greedy = eng.generate(prompt, 20, min_new_tokens=20)
    kw = dict(min_new_tokens=20, do_sample=True, temperature=0.8, top_p=0.9)
    a = eng.generate(prompt, 20, seed=3, **kw)
    np.testing.assert_array_equal(a, eng.generate(prompt, 20, seed=3, **kw))
    others = [eng.generate(prompt, 20, seed=s, **kw) for s in range(4, 8)]
    assert any((o != a).any() for o in others)
    np.testing.assert_array_equal(
        eng.generate(prompt, 20, do_sample=True, top_k=1, seed=5, min_new_tokens=20), greedy)


def test_sample_next_top_k_top_p():
    """The warpers keep exactly the top-k / nucleus tokens (hand-worked distribution)."""
    from tbt.runtime.engine import SamplingConfig, sample_next

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    rng = np.random.default_rng(0)
    seen_k = {int(sample_next(logits, SamplingConfig(True, top_k=2), rng)[0])
              for _ in range(300)}
    assert seen_k == {0, 1}
    seen_p = {int(sample_next(logits, SamplingConfig(True, top_p=0.9), rng)[0])
              for _ in range(300)}
    assert seen_p == {0, 1, 2}  # 0.5 + 0.3 < 0.9 <= 0.5 + 0.3 + 0.15
    assert int(sample_next(logits, SamplingConfig(), rng)[0]) == 0


def test_eos_stops_and_pads(ckpts):
    from tbt.runtime.engine import Engine

    eng = Engine.from_packed_dir(ckpts[("llama", "2-2-8", "packed")])
    prompt = _prompt(1, 5, 12)
    free = eng.generate(prompt, 10, eos_token_id=None)[0, 5:]
    stop = int(free[3])
    out = eng.generate(prompt, 10, eos_token_id=stop)[0, 5:]
    first = int(np.flatnonzero(free == stop)[0])
    np.testing.assert_array_equal(out, free[:first + 1])


def test_torch_sum_matches_torch():
    """engine.c's float32 sum reproduces torch's (one thread), the means' rounding."""
    from tbt.runtime.engine import _lib

    lib = _lib()
    fn = lib.tbt_torch_sum
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_void_p, ctypes.c_int64]
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for n in [*range(1, 80), 576, 1000, 4097, 40000]:
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
        assert fn(x.ctypes.data, n) == float(torch.from_numpy(x).sum()), n


def test_rope_tables_equal_transformers():
    from tbt.runtime.engine import _rope_tables

    cfg = tf.LlamaConfig(**SHAPE)
    rot = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    pos = torch.arange(200)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    c, s = _rope_tables(json.loads(cfg.to_json_string()), 16, 200)
    np.testing.assert_allclose(c, cos[0, :, :8].numpy(), rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(s, sin[0, :, :8].numpy(), rtol=0, atol=1.2e-7)


def test_unsupported_family_says_what_to_use(tmp_path):
    from tbt.config import QuantConfig
    from tbt.export.io import save_packed
    from tbt.quant.surgery import quantize_model
    from tbt.runtime.engine import Engine, EngineError

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4, decoder_start_token_id=0))
    save_packed(quantize_model(t5, QuantConfig(bits="2-2-8")), tmp_path / "t5")
    with pytest.raises(EngineError, match="load_packed"):
        Engine.from_packed_dir(tmp_path / "t5")
    with pytest.raises(FileNotFoundError, match="not a tbt packed checkpoint"):
        Engine.from_packed_dir(tmp_path)


def test_runs_without_torch(ckpts):
    """The engine imports and decodes with torch blocked (sys.modules['torch'] = None)."""
    d = ckpts[("llama", "2-2-8", "packed")]
    prompt = _prompt(1, 6, 13)
    want = _torch_tokens(d, prompt, 12)
    code = (
        "import sys, json\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from tbt.runtime.engine import Engine\n"
        f"e = Engine.from_packed_dir({str(d)!r})\n"
        f"out = e.generate(np.array({prompt.tolist()}), 12, min_new_tokens=12)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(json.dumps(out[:, 6:].tolist()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    np.testing.assert_array_equal(np.array(json.loads(res.stdout.strip().splitlines()[-1])),
                                  want)


def test_load_packed_engine_native(ckpts):
    from tbt.export.io import load_packed
    from tbt.runtime.engine import Engine

    eng = load_packed(ckpts[("llama", "2-2-8", "packed")], engine="native")
    assert isinstance(eng, Engine)
    with pytest.raises(ValueError, match="engine"):
        load_packed(ckpts[("llama", "2-2-8", "packed")], engine="bogus")


def test_cli_generate_streams_the_engine_tokens(ckpts):
    from tbt.runtime.engine import Engine

    d = ckpts[("llama", "2-2-8", "packed")]
    want = Engine.from_packed_dir(d).generate([5, 6, 7], 8, min_new_tokens=8)[3:]
    res = subprocess.run([sys.executable, "-m", "tbt", "generate", "--model", str(d),
                          "--prompt-ids", "5,6,7", "--max-new-tokens", "8",
                          "--min-new-tokens", "8"], capture_output=True, text=True, check=True)
    assert [int(t) for t in res.stdout.split()] == want.tolist()
    assert "tokens/s" in res.stderr
    bad = subprocess.run([sys.executable, "-m", "tbt", "generate", "--model", str(d),
                          "--prompt", "hello"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--prompt-ids" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_generate_text_with_tokenizer(ckpts, tmp_path):
    """--prompt through the checkpoint's tokenizer.json; the streamed text is the decoded
    engine output."""
    import shutil

    tokenizers = pytest.importorskip("tokenizers")
    from tbt.runtime.engine import Engine

    d = tmp_path / "with-tok"
    shutil.copytree(ckpts[("llama", "2-2-8", "packed")], d)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    want = Engine.from_packed_dir(d).generate([5, 6, 7], 6, min_new_tokens=6)[3:]
    res = subprocess.run([sys.executable, "-m", "tbt", "generate", "--model", str(d),
                          "--prompt", "w5 w6 w7", "--max-new-tokens", "6",
                          "--min-new-tokens", "6"], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == tok.decode(want.tolist())


def test_engine_refuses_damaged_checkpoints(ckpts, tmp_path):
    """The engine's loader holds the checks of load_packed (docs/format.md §8): a flipped byte
    in the tensor data, an edited config.json, and a NaN scale in a re-signed file."""
    import shutil

    import torch
    from packed_resign import read, resign

    from tbt.export.format import FormatError
    from tbt.runtime.engine import Engine

    src = ckpts[("llama", "2-2-8", "packed")]
    Engine.from_packed_dir(src)  # the genuine file loads

    flipped = shutil.copytree(src, tmp_path / "flipped")
    weights = flipped / "tbt_packed.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x10  # inside the last tensor's bytes, past the header
    weights.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum"):
        Engine.from_packed_dir(flipped)

    edited = shutil.copytree(src, tmp_path / "edited")
    cfg = edited / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps"', '"rms_norm_eps_x"'))
    with pytest.raises(FormatError, match="config.json"):
        Engine.from_packed_dir(edited)

    nan = shutil.copytree(src, tmp_path / "nan")
    state, md = read(nan)
    scale = next(k for k in state if k.endswith(".scale") or k.endswith("weight_scale"))
    state[scale] = state[scale].clone()
    state[scale].view(-1)[0] = float("nan")
    resign(nan, state, md)
    with pytest.raises(FormatError, match="invalid value"):
        Engine.from_packed_dir(nan)
    assert torch.isnan(read(nan)[0][scale]).any()  # the file really holds the NaN
