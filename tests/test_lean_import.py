"""`import tbt` must not pull in transformers, datasets, accelerate (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("transformers", "datasets", "accelerate", "sacrebleu", "rouge_score")


def test_import_tbt_is_light():
    code = (
        "import sys, tbt, tbt.quant, tbt.config, tbt.cli\n"
        "tbt.cli.build_parser()\n"
        "tbt.QuantConfig(bits='2-2-8')\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_is_light():
    out = subprocess.run([sys.executable, "-m", "tbt", "--help"], capture_output=True, text=True,
                         check=True)
    assert "usage: tbt" in out.stdout


def test_config_and_registries_import_no_torch():
    # the registry type and the weight registry are torch-free; the methods load on first read
    code = ("import sys, tbt.config, tbt.registry, tbt.quant.weight_registry\n"
            "assert 'torch' not in sys.modules, 'torch'\n"
            "from tbt.quant.weight_registry import WEIGHT_METHODS\n"
            "assert 'twn' in WEIGHT_METHODS and 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
