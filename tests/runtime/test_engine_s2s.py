"""The native engine on encoder-decoder checkpoints (tbt.runtime.engine_s2s) against the torch
backend.

Tiny random BART, mBART and Marian models in every E-W-A setting the engine runs are quantized,
their α initialised from one batch, saved packed, then decoded by ``load_packed(dir).generate``
(transformers' generate on the torch backend, one torch thread) and by the engine: greedy
tokens and beam-search tokens must be equal, for batches of padded sources of several lengths.
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

from conftest import VOCAB, _seq2seq_kw  # noqa: E402

from tbt.runtime.kernels import native  # noqa: E402

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")


def _model(family: str, act: str | None, scale: bool):
    kw = _seq2seq_kw()
    if act:
        kw["activation_function"] = act
    kw["scale_embedding"] = scale
    torch.manual_seed(0)
    if family == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(**kw))
    if family == "mbart":
        return tf.MBartForConditionalGeneration(tf.MBartConfig(**kw))
    kw.update(decoder_start_token_id=1, pad_token_id=1, decoder_vocab_size=VOCAB)
    return tf.MarianMTModel(tf.MarianConfig(**kw))


def _build(tmp, family: str, bits: str, head: str, variant: str = "paper", act: str | None = None,
           scale: bool = False):
    from tbt.config import QuantConfig
    from tbt.export.io import save_packed
    from tbt.quant.surgery import quantize_model

    fp = _model(family, act, scale).eval()
    with torch.no_grad():  # random init leaves these 1 / 0: give the engine something to add
        g = torch.Generator().manual_seed(3)
        for mod in fp.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            elif isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=g))
        fp.final_logits_bias.copy_(0.5 * torch.randn(fp.final_logits_bias.shape, generator=g))
    qcfg = QuantConfig(bits=bits, variant=variant,
                       skip_modules=() if head == "packed" else ("lm_head",))
    m = quantize_model(copy.deepcopy(fp), qcfg).train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ids = torch.randint(3, VOCAB, (2, 12), generator=g)
        m(input_ids=ids, decoder_input_ids=ids[:, :7])
    m.eval()
    d = tmp / f"{family}-{bits}-{head}-{variant}-{act}-{scale}"
    save_packed(m, d, lm_head="int8" if head == "int8" else "fp")
    return d


# (family, bits, head, variant, activation, scale_embedding)
CASES = [("bart", "2-2-8", "packed", "paper", None, False),
         ("bart", "1-1-8", "packed", "paper", None, False),
         ("bart", "2-2-2", "packed", "paper", None, False),
         ("bart", "1-1-1", "packed", "paper", None, False),
         ("bart", "2-2-2", "packed", "released", None, False),
         ("bart", "1-1-1", "fp", "released", None, False),
         ("mbart", "2-2-8", "packed", "paper", None, False),
         ("mbart", "1-1-1", "fp", "paper", "relu", True),
         ("marian", "2-2-8", "packed", "paper", "swish", True),
         ("marian", "2-2-2", "int8", "paper", None, False)]


def _id(case) -> str:
    return "-".join(str(c) for c in case if c not in (None, False))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine_s2s")
    return {case: _build(tmp, *case) for case in CASES}


def _sources(lens: list[int], seed: int, pad: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random sources padded on the right (pad id, mask 0) to the longest."""
    rng = np.random.default_rng(seed)
    S = max(lens)
    ids = rng.integers(3, VOCAB, (len(lens), S))
    mask = (np.arange(S)[None, :] < np.array(lens)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, pad), mask


def _torch_generate(d, ids: np.ndarray, mask: np.ndarray, n: int, backend: str = "auto",
                    **kw) -> np.ndarray:
    from tbt.export.io import load_packed

    torch.set_num_threads(1)  # the engine reproduces torch's one-thread sums (engine.c)
    model = load_packed(d, backend=backend)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.from_numpy(ids),
                             attention_mask=torch.from_numpy(mask), max_new_tokens=n,
                             do_sample=False, **kw)
    return out.numpy()


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_greedy_tokens_equal_torch_backend(ckpts, case):
    from tbt.runtime.engine import Engine
    from tbt.runtime.engine_s2s import Seq2SeqEngine

    eng = Engine.from_packed_dir(ckpts[case])
    assert isinstance(eng, Seq2SeqEngine)
    for lens, seed in (([7], 0), ([4, 11, 8], 1), ([1, 5], 2)):
        ids, mask = _sources(lens, seed)
        # the int8 head runs as its dequantized matrix: the values of backend="torch" (the
        # per-layer native backend uses fbgemm's dynamic int8, which rounds differently)
        want = _torch_generate(ckpts[case], ids, mask, 16, min_new_tokens=16, num_beams=1,
                               backend="torch" if case[2] == "int8" else "auto")
        got = eng.generate(ids, mask, 16, min_new_tokens=16, num_beams=1)
        np.testing.assert_array_equal(got, want, err_msg=f"source lengths {lens}")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[6], CASES[8]], ids=_id)
@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_transformers(ckpts, case, num_beams):
    """transformers' beam search on the torch backend, token for token: fixed length, a
    length penalty, early stopping with no_repeat_ngram_size, and an end token that occurs."""
    from tbt.runtime.engine import Engine

    d = ckpts[case]
    eng = Engine.from_packed_dir(d)
    ids, mask = _sources([9, 5], 3)
    free = eng.generate(ids, mask, 12, min_new_tokens=12, num_beams=num_beams)
    common = int(np.bincount(free[:, 1:].ravel()).argmax())  # an end token that will be hit
    for n, kw in ((12, dict(min_new_tokens=12)),
                  (16, dict(min_new_tokens=2, length_penalty=2.0)),
                  (16, dict(min_new_tokens=2, early_stopping=True, no_repeat_ngram_size=2)),
                  (16, dict(min_new_tokens=1, eos_token_id=common))):
        want = _torch_generate(d, ids, mask, n, num_beams=num_beams, **kw)
        got = eng.generate(ids, mask, n, num_beams=num_beams, **kw)
        np.testing.assert_array_equal(got, want, err_msg=str(kw))


def test_sampling_reproducible_and_top_k_1_is_greedy(ckpts):
    from tbt.runtime.engine import Engine

    eng = Engine.from_packed_dir(ckpts[CASES[8]])
    ids, mask = _sources([6, 9], 11)
    greedy = eng.generate(ids, mask, 12, min_new_tokens=12)
    kw = dict(min_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9)
    a = eng.generate(ids, mask, 12, seed=3, **kw)
    np.testing.assert_array_equal(a, eng.generate(ids, mask, 12, seed=3, **kw))
    assert any((eng.generate(ids, mask, 12, seed=s, **kw) != a).any() for s in range(4, 8))
    np.testing.assert_array_equal(
        eng.generate(ids, mask, 12, min_new_tokens=12, do_sample=True, top_k=1, seed=5), greedy)


def test_greedy_end_token_pads_finished_rows(ckpts):
    """After its end token a finished row is fed pad tokens (as transformers does: the
    quantizers' statistics span the batch) and the output stops when all rows are done."""
    from tbt.runtime.engine import Engine

    d = ckpts[CASES[0]]
    eng = Engine.from_packed_dir(d)
    ids, mask = _sources([6, 10, 3], 4)
    free = eng.generate(ids, mask, 12, min_new_tokens=12)
    stop = int(free[0, 4])
    want = _torch_generate(d, ids, mask, 12, eos_token_id=stop)
    got = eng.generate(ids, mask, 12, eos_token_id=stop)
    np.testing.assert_array_equal(got, want)


def test_forced_bos_and_eos(ckpts):
    from tbt.runtime.engine import Engine

    d = ckpts[CASES[6]]  # mBART
    eng = Engine.from_packed_dir(d)
    ids, mask = _sources([7, 4], 5)
    for nb in (1, 3):
        kw = dict(forced_bos_token_id=17, forced_eos_token_id=2, num_beams=nb)
        got = eng.generate(ids, mask, 10, **kw)
        np.testing.assert_array_equal(got, _torch_generate(d, ids, mask, 10, **kw))
        assert (got[:, 1] == 17).all()


def test_cross_attention_kv_computed_once_per_source(ckpts):
    """The encoder and the cross-attention K/V projections run once per generate call (one
    C call each per decoder layer), however many decoding steps follow; beams reuse them."""
    from tbt.runtime.engine import Engine

    eng = Engine.from_packed_dir(ckpts[CASES[0]])
    ids, mask = _sources([9, 5], 6)
    n_layers = eng.dec_layers
    eng.generate(ids, mask, 20, min_new_tokens=20)
    assert eng.call_counts == {"encode": 1, "cross_kv": n_layers, "step": 20, "reorder": 0}
    eng.generate(ids, mask, 10, min_new_tokens=10, num_beams=4)
    c = eng.call_counts
    assert (c["encode"], c["cross_kv"], c["step"]) == (2, 2 * n_layers, 30)
    assert c["reorder"] == 10


def test_step_logits_equal_torch(ckpts):
    """Decoder-step logits against the torch model fed the same tokens (float32 rounding)."""
    from tbt.export.io import load_packed
    from tbt.runtime.engine import Engine

    d = ckpts[CASES[6]]
    torch.set_num_threads(1)
    eng = Engine.from_packed_dir(d)
    model = load_packed(d)
    ids, mask = _sources([8, 3], 7)
    eng.encode(ids, mask, max_new_tokens=6)
    toks = np.random.default_rng(8).integers(3, VOCAB, (2, 6))
    toks[:, 0] = eng.generation_config["decoder_start_token_id"]
    with torch.inference_mode():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     decoder_input_ids=torch.from_numpy(toks[:, :1])).logits[:, -1].numpy()
    np.testing.assert_allclose(eng.step(toks[:, 0]), want, rtol=1e-5, atol=1e-5)


def test_layer_norm_equals_torch():
    """csrc/engine_s2s.c's LayerNorm is torch's CPU kernel bit for bit on rows of up to 128
    floats (one Welford chunk, any tail); docs/engine.md gives the tolerance beyond."""
    from tbt.runtime.engine import _lib

    fn = _lib().tbt_layer_norm
    P = ctypes.c_void_p
    fn.argtypes = [P, P, P, ctypes.c_float, ctypes.c_int64, P]
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for n in (3, 8, 16, 32, 37, 64, 100, 128):
        for _ in range(50):
            x = (rng.standard_normal(n) * rng.uniform(0.1, 10) + rng.uniform(-3, 3)).astype(
                np.float32)
            w, b = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
            want = torch.nn.functional.layer_norm(torch.from_numpy(x)[None], (n,),
                                                  torch.from_numpy(w), torch.from_numpy(b),
                                                  1e-5)[0].numpy()
            got = np.empty(n, np.float32)
            fn(x.ctypes.data, w.ctypes.data, b.ctypes.data, 1e-5, n, got.ctypes.data)
            np.testing.assert_array_equal(got, want)


def test_runs_without_torch(ckpts):
    """The encoder-decoder engine imports and decodes with torch blocked."""
    d = ckpts[CASES[0]]
    ids, mask = _sources([6, 3], 9)
    want = _torch_generate(d, ids, mask, 10, min_new_tokens=10, num_beams=2)
    code = (
        "import sys, json\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from tbt.runtime.engine import Engine\n"
        f"e = Engine.from_packed_dir({str(d)!r})\n"
        f"out = e.generate(np.array({ids.tolist()}), np.array({mask.tolist()}), 10,"
        " min_new_tokens=10, num_beams=2)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(json.dumps(out.tolist()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    np.testing.assert_array_equal(np.array(json.loads(res.stdout.strip().splitlines()[-1])),
                                  want)


def test_load_packed_engine_native_and_damaged_file(ckpts, tmp_path):
    import shutil

    from tbt.export.format import FormatError
    from tbt.export.io import load_packed
    from tbt.runtime.engine_s2s import Seq2SeqEngine

    src = ckpts[CASES[0]]
    assert isinstance(load_packed(src, engine="native"), Seq2SeqEngine)
    flipped = shutil.copytree(src, tmp_path / "flipped")
    weights = flipped / "tbt_packed.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x10
    weights.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum"):
        Seq2SeqEngine(flipped)


def test_bad_input_says_what_is_wrong(ckpts):
    from tbt.runtime.engine import Engine

    eng = Engine.from_packed_dir(ckpts[CASES[0]])
    with pytest.raises(ValueError, match="at least one unmasked token"):
        eng.generate([[5, 6]], [[0, 0]], 4)
    with pytest.raises(ValueError, match="token ids"):
        eng.generate([[5, VOCAB]], None, 4)
    with pytest.raises(ValueError, match="positions exceed"):
        eng.generate([[5, 6]], None, 500)


def test_cli_evaluate_packed_folder_native_equals_torch(ckpts, tmp_path):
    """tbt evaluate on a packed BART folder runs the engine; --engine torch runs the
    transformers model on the packed layers: the same predictions (beam search, padding)."""
    import shutil

    tokenizers = pytest.importorskip("tokenizers")
    d = shutil.copytree(ckpts[CASES[0]], tmp_path / "packed")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="w3").save_pretrained(d)
    rng = np.random.default_rng(10)
    test = tmp_path / "test.jsonl"
    with open(test, "w") as f:
        for n in (5, 9, 3, 12, 7):
            words = " ".join(f"w{i}" for i in rng.integers(3, VOCAB, n))
            f.write(json.dumps({"document": words, "summary": words.split()[0]}) + "\n")
    preds = {}
    for engine in ("native", "torch"):
        out = tmp_path / engine
        res = subprocess.run([sys.executable, "-m", "tbt", "evaluate", "--model", str(d),
                              "--test-file", str(test), "--output-dir", str(out),
                              "--num-beams", "2", "--max-length", "10", "--batch-size", "3",
                              "--engine", engine, "--no-progress"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert ("native engine" in res.stdout) == (engine == "native")
        preds[engine] = [json.loads(line)["prediction"]
                         for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds["native"]) == 5 and any(preds["native"])
    assert preds["native"] == preds["torch"]


def test_cli_generate_seq2seq(ckpts):
    from tbt.runtime.engine import Engine

    d = ckpts[CASES[6]]
    eng = Engine.from_packed_dir(d)
    for extra, nb in (([], 1), (["--num-beams", "3"], 3)):
        want = eng.generate([[5, 6, 7, 8]], None, 8, min_new_tokens=8, num_beams=nb)[0, 1:]
        res = subprocess.run([sys.executable, "-m", "tbt", "generate", "--model", str(d),
                              "--prompt-ids", "5,6,7,8", "--max-new-tokens", "8",
                              "--min-new-tokens", "8", *extra], capture_output=True, text=True,
                             check=True)
        assert [int(t) for t in res.stdout.split()] == want.tolist()
