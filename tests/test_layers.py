"""No module imports from a higher layer, at module level or inside a function.

The layers, lowest first (``docs/architecture.md`` says what each holds and why):

====  =========  ============================================================================
 0    core       ``tbt.registry``, ``tbt.export.format``, ``tbt.export.pack``, ``tbt._lock``:
                 torch-free primitives (the registry type, the packed format, the bit packer,
                 the run lock)
 1    runtime    ``tbt.runtime``: numpy kernels and packed layers (torch-free)
 2    quant      ``tbt.config``, ``tbt.quant``: QuantConfig, quantizers, registries, surgery,
                 the transformers hooks of quantized models (attention, quantization config)
 3    inference  ``tbt.inference``: the torch modules that run packed layers (on the runtime)
 4    models     ``tbt.models`` (the MatMul-free LM), ``tbt.distill`` (losses, captures)
 5    hf         ``tbt.hf``: loading checkpoints through transformers
 6    export     ``tbt.export``: packing trained models, load_packed
 7    ptq        ``tbt.ptq``: post-training methods and their packed checkpoints
 8    eval       ``tbt.data``, ``tbt.eval``: datasets to batches, metrics, generation
 9    train      ``tbt.train``: the training loop, recipes, the copy warm-up
10    demo       ``tbt.demo``: the demo, ablation and paper-replication runners, their corpus
                 and plots
11    bench      ``tbt.bench``: the kernel benchmark harness behind ``tbt bench``
12    cli        ``tbt.cli``, ``tbt.__main__``
13    api        ``tbt`` (the package): its lazy attributes reach every layer
====  =========  ============================================================================

A module may import from its own layer or any lower one. Imports are read with ``ast`` from
every module: ``import`` and ``from ... import`` statements anywhere (functions included),
``importlib.import_module("tbt...")`` with a constant name, and the module names of a
package's lazy ``_LAZY`` table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# (layer, module patterns): "a.b" is that module alone, "a.b.*" the package and its modules
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("tbt.registry", "tbt.export.format", "tbt.export.pack", "tbt.export.integrity",
              "tbt._paths", "tbt._lock")),
    ("runtime", ("tbt.runtime.*",)),
    ("quant", ("tbt.config", "tbt.quant.*")),
    ("inference", ("tbt.inference.*",)),
    ("models", ("tbt.models.*", "tbt.distill.*")),
    ("hf", ("tbt.hf.*",)),
    ("export", ("tbt.export.*",)),
    ("ptq", ("tbt.ptq.*",)),
    ("eval", ("tbt.data", "tbt.eval.*")),
    ("train", ("tbt.train.*",)),
    ("demo", ("tbt.demo.*",)),
    ("bench", ("tbt.bench",)),
    ("cli", ("tbt.cli.*", "tbt.__main__")),
    ("api", ("tbt",)),
)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    """The layer of a module: its most specific pattern (an exact name before a package)."""
    best, best_len = None, -1
    for name, patterns in LAYERS:
        for p in patterns:
            if p.endswith(".*"):
                pkg = p[:-2]
                hit = module == pkg or module.startswith(pkg + ".")
                size = len(pkg)
            else:
                hit, size = module == p, len(p) + 1  # an exact name beats its package
            if hit and size > best_len:
                best, best_len = name, size
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and "
                             f"docs/architecture.md)")
    return best


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "tbt").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(base: str, name: str | None) -> str:
    """``from base import name``: the submodule ``base.name`` if there is one, else ``base``."""
    if name and f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    return base


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported tbt module) for every import in ``path``, nested ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found += [(node.lineno, _target(base, a.name)) for a in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            found.append((node.lineno, node.args[0].value))
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
              and any(getattr(t, "id", None) == "_LAZY" for t in node.targets)):
            found += [(node.lineno, v.value) for v in node.value.values
                      if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return [(line, m) for line, m in found if m == "tbt" or m.startswith("tbt.")]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    here = layer_of(module)
    bad = [f"{MODULES[module].relative_to(SRC)}:{line}: {module} ({here}) imports {target} "
           f"({layer_of(target)})"
           for line, target in imports_of(module, MODULES[module])
           if RANK[layer_of(target)] > RANK[here]]
    assert not bad, "upward import(s), see docs/architecture.md:\n" + "\n".join(bad)


def test_the_checker_sees_nested_and_dynamic_imports(tmp_path):
    # an independent example: a function-level import, a relative one, importlib, _LAZY
    code = ("import importlib\n"
            "def f():\n"
            "    from tbt.train import loop\n"
            "    from ..cli import train\n"
            "    importlib.import_module('tbt.eval.metrics')\n"
            "_LAZY = {'x': 'tbt.hf'}\n")
    p = tmp_path / "m.py"
    p.write_text(code)
    got = sorted(m for _, m in imports_of("tbt.quant.m", p))
    assert got == ["tbt.cli.train", "tbt.eval.metrics", "tbt.hf", "tbt.train.loop"]
    assert [layer_of(m) for m in got] == ["cli", "eval", "hf", "train"]
    assert layer_of("tbt.inference.packed") == "inference" and layer_of("tbt.models") == "models"
    assert layer_of("tbt") == "api" and layer_of("tbt.export.format") == "core"
