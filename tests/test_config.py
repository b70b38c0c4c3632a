"""QuantConfig: E-W-A parsing, JSON round trip, and errors that say what to fix."""

from __future__ import annotations

import itertools

import pytest

from tbt import QuantConfig, parse_bits


@pytest.mark.parametrize("spelling,expected", [
    ("2-2-8", (2, 2, 8)), ("1-1-1", (1, 1, 1)), ("2-2-32", (2, 2, None)), ("32-2-8", (None, 2, 8)),
    ("fp", (None, None, None)), ("FP-2-fp", (None, 2, None)), ("8-8-8", (8, 8, 8)),
])
def test_parse_bits(spelling, expected):
    assert parse_bits(spelling) == expected


@pytest.mark.parametrize("bits,method,variant,gran", list(itertools.product(
    ["2-2-8", "2-2-2", "1-1-8", "1-1-1", "2-2-fp"], ["tbt"], ["paper", "released"], [None, "tensor"])))
def test_json_round_trip(bits, method, variant, gran):
    cfg = QuantConfig(bits=bits, method=method, variant=variant, granularity=gran,
                      skip_modules=("lm_head", "*fc1"), unsigned_inputs=("*fc2",))
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)


def test_normalises_and_derives():
    cfg = QuantConfig(bits="32-2-8")
    assert cfg.bits == "fp-2-8" and cfg.embed_bits is None and cfg.weight_bits == 2
    assert QuantConfig(bits="2-2-8").resolved_act_method == "minmax"
    assert QuantConfig(bits="2-2-2").resolved_act_method == "elastic"
    assert QuantConfig(bits="8-8-8", method="uniform").weight_bits == 8
    assert QuantConfig.released("1-1-1").variant == "released"
    with pytest.raises(Exception):
        QuantConfig().bits = "1-1-1"  # frozen


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits="2-2"), "E-W-A"),
    (dict(bits="2-x-8"), "not a number"),
    (dict(bits="2-2-9"), "1..8"),
    (dict(bits="3-3-8"), "uniform"),  # tbt is 1/2-bit only: the message points to 'uniform'
    (dict(method="nope"), "choose one of"),
    (dict(variant="code"), "paper"),
    (dict(granularity="col"), "row"),
    (dict(bits="2-2-1", act_method="minmax"), "elastic"),  # min/max is 2..8-bit
    (dict(act_clip=0), "positive"),
])
def test_bad_input_names_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_unknown_field_in_json():
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"bits": "2-2-8", "wbits": 2})


# config.json's "quantization_config" as tbt 0.1 wrote it before method options had their own
# home: every field at the top level, the three method options included whatever the method
OLD_FIELDS = {"act_clip": 2.5, "act_method": "auto", "granularity": None, "group_size": 128,
              "num_shards": 1, "quantize_attention": True, "salient_frac": 0.1,
              "skip_modules": ["lm_head"], "tequila_lambda": 0.001, "unsigned_inputs": None,
              "variant": "paper", "version": 1, "weight_clip": 2.5, "quant_method": "tbt"}


@pytest.mark.parametrize("method,bits,old,options", [
    ("tbt", "2-2-8", {}, {}),
    ("twn", "2-2-8", {"weight_clip": 1.5}, {"clip": 1.5}),
    ("twn", "2-2-2", {}, {"clip": 2.5}),
    ("tequila", "fp-2-8", {"tequila_lambda": 0.05}, {"lambda": 0.05}),
    ("pbllm", "1-1-8", {"salient_frac": 0.2}, {"salient_frac": 0.2}),
    ("tbt", "fp", {}, {}),
])
def test_old_config_json_still_loads(method, bits, old, options):
    import json

    text = json.dumps({**OLD_FIELDS, "bits": bits, "method": method, **old})
    cfg = QuantConfig.from_json(text)
    assert cfg.method == method and cfg.options == options
    assert cfg == QuantConfig(bits=bits, method=method, method_options=options)
    assert QuantConfig.from_json(cfg.to_json()) == cfg  # and the new form round-trips


def test_method_options_are_checked_against_the_method():
    with pytest.raises(ValueError, match=r"method='tbt' has no option\(s\) \['lambda'\]; its "
                                         r"options: none"):
        QuantConfig(method="tbt", method_options={"lambda": 0.1})
    with pytest.raises(ValueError, match=r"tequila option lambda must be a number >= 0\.0"):
        QuantConfig(bits="fp-2-8", method="tequila", method_options={"lambda": -1})
    spec = QuantConfig(bits="2-2-8", method="twn", method_options={"clip": 1.0}).weight_spec(2)
    assert spec.option("clip") == 1.0 and spec.bits == 2 and spec.method == "twn"


def test_old_hf_quantization_config_still_loads():
    # what transformers hands tbt's quantizer when it reads an old config.json
    from tbt.quant.hf_quantizer import TbtQuantizationConfig

    old = {**OLD_FIELDS, "bits": "2-2-8", "method": "twn", "weight_clip": 1.5}
    got = TbtQuantizationConfig(**old).to_quant_config()
    assert got == QuantConfig(bits="2-2-8", method="twn", method_options={"clip": 1.5})


def test_flag_overrides_saved_method_options():
    # a saved config (method_options) merged with a later --tequila-lambda flag: the flag wins
    saved = QuantConfig(bits="fp-2-8", method="tequila", method_options={"lambda": 0.02})
    d = {**saved.to_dict(), "tequila_lambda": 0.05}
    assert QuantConfig.from_dict(d).options == {"lambda": 0.05}
