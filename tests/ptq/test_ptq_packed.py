"""Packed PTQTP / PB-LLM / BiLLM checkpoints (docs/format.md §9) on a tiny Llama.

The reference is the PTQ model itself (its linears hold the dequantized PTQ weights Ŵ): the
packed model rebuilt by ``load_packed`` must give the same logits and the same greedy tokens,
``tbt inspect`` must print the bits ``tbt ptq`` counts, and broken files must be FormatErrors.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny
from packed_resign import resign

from tbt.cli import main
from tbt.export.format import FormatError
from tbt.export.io import WEIGHTS_NAME, load_packed, read_packed_metadata
from tbt.export.pack import pack_uint, unpack_uint
from tbt.export.ptq_layers import SchemeLinear, layer_bits
from tbt.ptq import EoRAConfig, LowRankAdapter, PTQConfig, make_method_config, quantize_model_ptq
from tbt.ptq.save import save_packed_ptq

pytest.importorskip("transformers")

OPTIONS = {"ptqtp": {"group_size": 16, "iters": 10},
           "pbllm": {"salient_frac": 0.1, "block_size": 16},
           "billm": {"block_size": 16, "max_salient": 8}}
IDS = torch.tensor([[5, 9, 17, 3, 44, 100, 7, 12]])


def _batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 120, (2, 16), generator=g),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(3)]


def _ptq(method: str, eora: EoRAConfig | None = None, options: dict | None = None):
    model = make_tiny("llama").eval()
    mcfg = make_method_config(method, OPTIONS[method] if options is None else options)
    cfg = PTQConfig(method=method, method_config=mcfg, eora=eora, keep_tensors=True)
    report = quantize_model_ptq(model, cfg, _batches())
    return model, report, cfg


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def saved(request, tmp_path_factory):
    model, report, cfg = _ptq(request.param)
    d = tmp_path_factory.mktemp(request.param) / "packed"
    assert save_packed_ptq(model, report, cfg, str(d)) == str(d)
    return request.param, model, report, d


def test_logits_and_greedy_tokens_equal_the_ptq_model(saved):
    method, ptq, report, d = saved
    packed = load_packed(d)  # default backend: the PTQ layers stay on torch, the rest FP
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, SchemeLinear)}
    assert len(layers) == 14 and {m.scheme for m in layers.values()} == {method}
    for name, mod in layers.items():  # the stored codes rebuild Ŵ of the PTQ model
        w_hat = ptq.get_submodule(name).weight.detach()
        torch.testing.assert_close(mod.dequantized_weight(), w_hat, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(packed(IDS).logits, ptq(IDS).logits, atol=1e-5, rtol=1e-5)
    kw = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 1}
    assert torch.equal(packed.generate(IDS, **kw), ptq.generate(IDS, **kw))


def test_inspect_bits_match_the_method_accounting(saved, capsys):
    method, _, report, d = saved
    meta = read_packed_metadata(d)
    rows = {r["name"]: r for r in report.layers}
    for name, info in meta["layers"].items():
        stored, counted = layer_bits(info, meta["tensors"])
        assert counted == rows[name]["bits"]  # exact, per layer
        n_float = sum(int(np.prod(meta["tensors"][t][1])) for t in info["tensors"].values()
                      if meta["tensors"][t][0] == "F32")
        assert stored == counted + 16 * n_float  # scales on disk are float32
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    bpw = report.totals()["bits_per_weight"]
    assert f"bits per weight as tbt ptq counts them (float scales at 16 bits): {bpw:.3f}" in text
    assert text.count(f" {method} ") >= 14  # the per-layer format column


@pytest.mark.parametrize("method,options", [
    ("ptqtp", {"iters": 5}),  # one scale pair per row
    ("pbllm", {"salient_frac": 0.2, "center": False, "gptq": False}),
    ("pbllm", {"salient_frac": 0.05, "salient_metric": "hessian", "salient_bits": 4}),
    ("pbllm", {"salient_frac": 0.0}),  # no side-store at all
    ("billm", {"block_size": 24, "gptq": False, "salient_metric": "magnitude"}),  # ragged blocks
])
def test_method_variants_round_trip(tmp_path, method, options):
    model, report, cfg = _ptq(method, options=options)
    save_packed_ptq(model, report, cfg, str(tmp_path / "v"))
    meta = read_packed_metadata(tmp_path / "v")
    rows = {r["name"]: r["bits"] for r in report.layers}
    assert {n: layer_bits(i, meta["tensors"])[1] for n, i in meta["layers"].items()} == rows
    with torch.no_grad():
        torch.testing.assert_close(load_packed(tmp_path / "v")(IDS).logits, model(IDS).logits,
                                   atol=1e-5, rtol=1e-5)


def test_export_refuses_codes_that_do_not_rebuild_the_weights(tmp_path):
    model, report, cfg = _ptq("ptqtp")
    name = report.layers[3]["name"]
    report.tensors[name]["plane2"] = torch.zeros_like(report.tensors[name]["plane2"])
    with pytest.raises(RuntimeError, match=name):
        save_packed_ptq(model, report, cfg, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    assert all(not isinstance(m, SchemeLinear) for m in model.modules())  # put back
    report.tensors.clear()  # a run without keep_tensors=True
    with pytest.raises(ValueError, match="keep_tensors=True"):
        save_packed_ptq(model, report, cfg, str(tmp_path / "bad"))


def test_set_backend_keeps_the_ptq_layers_on_torch_and_says_why(saved):
    from tbt.inference.packed import set_backend

    _, _, _, d = saved
    model = load_packed(d, backend="torch")
    fallback = set_backend(model, "native")
    assert len(fallback) == 14 and all("weight-only" in r for r in fallback.values())


def test_pbllm_side_store_reads_as_documented(tmp_path):
    """Read the CSR side-store with numpy as docs/format.md §9 describes it (independent of
    the decoder): row pointers, 6-bit column indices, 8-bit codes; compare with the method."""
    from safetensors.numpy import load_file

    model, report, cfg = _ptq("pbllm")
    save_packed_ptq(model, report, cfg, str(tmp_path / "p"))
    info = read_packed_metadata(tmp_path / "p")["layers"]["model.layers.0.mlp.down_proj"]
    st = load_file(str(tmp_path / "p" / WEIGHTS_NAME))
    t = {r: st[k] for r, k in info["tensors"].items()}
    p = info["params"]
    assert p["index_bits"] == 6 and p["salient_bits"] == 8  # K = 64 -> ceil(log2 64) = 6
    bits = np.unpackbits(t["salient_index"], bitorder="little")[: p["nnz"] * 6].reshape(-1, 6)
    cols = (bits * (1 << np.arange(6))).sum(1)
    rows = np.repeat(np.arange(32), np.diff(t["row_ptr"]))
    want = report.tensors["model.layers.0.mlp.down_proj"]
    mask = np.zeros((32, 64), bool)
    mask[rows, cols] = True
    assert (mask == want["salient_mask"].numpy()).all()
    codes = t["salient_codes"]  # 8-bit codes: one byte each
    assert (codes == want["salient_codes"].numpy()[rows, cols]).all()
    signs = np.unpackbits(t["plane"], axis=1, count=64, bitorder="little")
    assert ((signs.astype(int) * 2 - 1) == want["signs"].numpy())[~mask].all()


def test_pack_uint_worked_bytes_and_round_trip():
    assert pack_uint(np.array([5, 3]), 3).tolist() == [0x1D]  # bits 1,0,1,1,1,0 LSB first
    v = np.random.default_rng(0).integers(0, 2 ** 11, 37)
    assert (unpack_uint(pack_uint(v, 11), 11, 37) == v).all()
    with pytest.raises(FormatError, match="stream"):
        unpack_uint(pack_uint(v, 11)[:-1], 11, 37)


def test_eora_on_top_runs_in_the_packed_model(tmp_path):
    model, report, cfg = _ptq("ptqtp", EoRAConfig(rank=2, adapter_dtype="float32"))
    save_packed_ptq(model, report, cfg, str(tmp_path / "e"))
    packed = load_packed(tmp_path / "e")
    adapters = [m for m in packed.modules() if isinstance(m, LowRankAdapter)]
    assert len(adapters) == 14 and all(isinstance(a.base, SchemeLinear) for a in adapters)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankAdapter)  # put back
    with torch.no_grad():
        want = model(IDS).logits
        torch.testing.assert_close(packed(IDS).logits, want, atol=1e-5, rtol=1e-5)
        for a in adapters:
            a.enabled = False
        assert (packed(IDS).logits - want).abs().max() > 1e-4  # the adapters do something
    from tbt.ptq.save import ADAPTERS_NAME

    f = tmp_path / "e" / ADAPTERS_NAME  # a damaged adapters file: FormatError, not wrong logits
    raw = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # the tensor data
    for pos in (start, (start + len(raw)) // 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        f.write_bytes(bytes(bad))
        with pytest.raises(FormatError, match="does not match its checksum"):
            load_packed(tmp_path / "e")
    f.write_bytes(bytes(raw[: len(raw) - 3]))
    with pytest.raises(FormatError, match="truncated or corrupted"):
        load_packed(tmp_path / "e")


def _rewrite(src, dst, edit):
    """Copy a packed dir, apply ``edit(state, layers)`` and re-sign the checksums, so only the
    layer validation can catch the change."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    f = dst / WEIGHTS_NAME
    with safe_open(str(f), "pt") as fh:
        md = dict(fh.metadata())
    state = load_file(str(f))
    layers = json.loads(md["tbt.layers"])
    edit(state, layers)
    md["tbt.layers"] = json.dumps(layers, sort_keys=True)
    return resign(dst, state, md)


def test_broken_files_are_format_errors(saved, tmp_path):
    method, _, _, d = saved
    name = "model.layers.1.mlp.up_proj"
    raw = (d / WEIGHTS_NAME).read_bytes()
    cut = tmp_path / "cut"
    shutil.copytree(d, cut)
    (cut / WEIGHTS_NAME).write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(FormatError, match="truncated or corrupted"):
        load_packed(cut)

    def wrong_shape(state, layers):
        key = layers[name]["tensors"]["plane1" if method != "pbllm" else "plane"]
        state[key] = state[key][:, :-1].contiguous()

    with pytest.raises(FormatError, match=rf"layer {name} \({method}\).*expected U8"):
        load_packed(_rewrite(d, tmp_path / "shape", wrong_shape))

    def wrong_dtype(state, layers):
        key = next(v for r, v in layers[name]["tensors"].items() if state[v].dtype == torch.uint8)
        state[key] = state[key].to(torch.int32)

    with pytest.raises(FormatError, match="expected U8"):
        load_packed(_rewrite(d, tmp_path / "dtype", wrong_dtype))

    def missing(state, layers):
        del state[layers[name]["tensors"]["alpha" if method != "billm" else "pairs"]]

    with pytest.raises(FormatError, match="missing"):
        load_packed(_rewrite(d, tmp_path / "missing", missing))

    def no_role(state, layers):
        layers[name]["tensors"].pop(next(iter(layers[name]["tensors"])))

    with pytest.raises(FormatError, match="tensor list"):
        load_packed(_rewrite(d, tmp_path / "role", no_role))


def test_corrupted_code_bytes_fail_at_first_use(tmp_path):
    """In a file whose checksums were recomputed after the edit, an invalid ternary code (3)
    in a PTQTP plane and a PB-LLM row pointer that does not reach nnz are caught when the layer
    is first decoded."""
    for method, role, value, match in (("ptqtp", "plane2", 0xFF, "code 3"),
                                       ("pbllm", "row_ptr", 10 ** 6, "row_ptr")):
        model, report, cfg = _ptq(method)
        src = tmp_path / f"{method}-ok"
        save_packed_ptq(model, report, cfg, str(src))

        def corrupt(state, layers, role=role, value=value):
            state[layers["model.layers.0.self_attn.o_proj"]["tensors"][role]][-1] = value

        bad = load_packed(_rewrite(src, tmp_path / method, corrupt))
        with pytest.raises(FormatError, match=match), torch.no_grad():
            bad(IDS)
