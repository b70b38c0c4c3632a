"""`tbt ablate`: suites resolve and the table is computed against each suite's baseline (the
end-to-end run reuses the quick demo's teacher: tests/demo/test_demo.py)."""

from __future__ import annotations

import pytest

from tbt.config import QuantConfig
from tbt.demo.ablate import SUITES, format_table, parse_suites


def test_every_suite_row_is_a_valid_quant_config():
    for suite, specs in SUITES.items():
        assert len({sp.name for sp in specs}) == len(specs), suite
        for sp in specs:
            cfg = QuantConfig(bits=sp.bits, method=sp.method, act_method=sp.act_method)
            assert cfg.bits == sp.bits
    t3 = {sp.name: (sp.method, sp.act_method) for sp in SUITES["table3-2-2-2"]}
    assert list(t3.values()) == [("twn", "minmax"), ("twn", "elastic"), ("tbt", "minmax"),
                                 ("tbt", "elastic")]  # the paper's Table 3 rows


def test_parse_suites_errors():
    assert parse_suites("weights-1-1-8, table3-2-2-2") == ("weights-1-1-8", "table3-2-2-2")
    with pytest.raises(ValueError, match="unknown suite"):
        parse_suites("table9")


def test_table_shows_difference_to_baseline():
    rows = [dict(suite="s", model=m, method="twn", act_method="auto", rouge1=r, rouge2=1.0,
                 rougeL=2.0, rougeLsum=r - 1, d_rouge1=r - 30.0, d_rougeLsum=r - 30.0,
                 gen_len=9.0) for m, r in (("base", 30.0), ("better", 32.5))]
    lines = format_table(rows).splitlines()
    assert lines[3].endswith("| 32.50 | 1.00 | 2.00 | 31.50 | +2.50 | +2.50 | 9.0 |")
