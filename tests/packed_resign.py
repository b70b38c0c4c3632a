"""Test helper: rewrite a packed checkpoint with *correct* checksums after an edit.

The checksums of ``docs/format.md`` §8 catch damage, not intent: anyone can recompute them.
Tests use this to build well-formed but wrong files (a crafted header, a NaN scale, an edited
config.json), so that only the check under test can catch them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tbt.export.integrity import (
    CHECKSUM_KEY,
    FILE_DIGESTS_KEY,
    TENSOR_DIGESTS_KEY,
    array_digest,
    file_digests,
    header_checksum,
)
from tbt.export.io import _ST_DTYPES, WEIGHTS_NAME, _tensor_bytes


def read(directory) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state, metadata)`` of ``directory``'s weights file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    f = Path(directory) / WEIGHTS_NAME
    with safe_open(str(f), "pt") as fh:
        md = dict(fh.metadata())
    return load_file(str(f)), md


def resign(directory, state: dict[str, torch.Tensor] | None = None,
           md: dict[str, str] | None = None) -> Path:
    """Write ``state``/``md`` (default: the file's own) with every checksum recomputed over
    them and over the config files now in ``directory``."""
    d = Path(directory)
    old_state, old_md = read(d)
    state = old_state if state is None else state
    md = dict(old_md if md is None else md)
    state = {k: v.contiguous() for k, v in state.items()}
    if TENSOR_DIGESTS_KEY in md or FILE_DIGESTS_KEY in md:
        md[TENSOR_DIGESTS_KEY] = json.dumps({k: array_digest(_tensor_bytes(t))
                                             for k, t in state.items()}, sort_keys=True)
        md[FILE_DIGESTS_KEY] = json.dumps(file_digests(d), sort_keys=True)
    md[CHECKSUM_KEY] = header_checksum(
        md, {k: (_ST_DTYPES[t.dtype], tuple(t.shape)) for k, t in state.items()})
    from safetensors.torch import save_file

    save_file(state, str(d / WEIGHTS_NAME), metadata=md)
    return d
