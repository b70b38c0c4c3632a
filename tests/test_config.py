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


@pytest.mark.parametrize("bits,method,variant,gran", itertools.product(
    ["2-2-8", "2-2-2", "1-1-8", "1-1-1", "2-2-fp"], ["tbt"], ["paper", "released"], [None, "tensor"]))
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
