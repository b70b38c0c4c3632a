"""``tbt inspect DIR``: the header, per-layer formats, sizes and bits per weight of a packed
checkpoint (plane layers and packed PTQ scheme layers, ``docs/format.md`` §9)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="show the format header, per-layer packings and sizes of a packed model",
        description="Read a directory written by tbt.export.save_packed and print its format "
                    "header, each packed layer (name, shape, packing, bits, bytes), the sizes "
                    "of the packed and full-precision parts and the bits per parameter.")
    p.add_argument("directory", metavar="DIR", help="packed checkpoint directory")
    p.set_defaults(func=run)


_DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4,
                "F64": 8, "I64": 8}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from tbt.export.io import read_packed_metadata
    from tbt.export.ptq_layers import layer_keys, tensor_bits

    meta = read_packed_metadata(args.directory)
    tensors = meta["tensors"]
    nbytes = {k: _numel(shape) * _DTYPE_BYTES.get(dtype, 4)
              for k, (dtype, shape) in tensors.items()}

    print(f"{meta['path']}")
    print("format header:")
    for k, v in asdict(meta["header"]).items():
        print(f"  {k:18s} {v}")
    print(f"model class: {meta['model_class']}")
    qc = json.loads(meta["quant_config"])
    print(f"quant config: bits={qc.get('bits')} method={qc.get('method')} "
          f"variant={qc.get('variant')}")
    schemes: dict[str, int] = {}
    for info in meta["layers"].values():
        if "scheme" in info:
            schemes[info["scheme"]] = schemes.get(info["scheme"], 0) + 1
    if schemes:  # the weights are in the PTQ layers, not in the quant config
        print("packed PTQ layers (docs/format.md §9, float activations): "
              + ", ".join(f"{k} x{v}" for k, v in sorted(schemes.items())))

    print("packed layers (bpw: stored bits per weight, scales as stored):")
    print(f"  {'name':56s} {'shape':>12s} {'format':14s} {'bits':>4s} {'bytes':>10s} "
          f"{'bpw':>7s}")
    q_params = q_bits = q_bits16 = 0
    counted: set[str] = set()
    for name, info in sorted(meta["layers"].items()):
        n, k = info["shape"]
        size = 0
        keys = layer_keys(info)  # a packed PTQ layer lists its tensors; else packed + scale
        for key in keys:
            if key not in counted:  # shared tensors (tied embeddings) count once
                counted.add(key)
                size += nbytes[key]
        if size:
            q_params += n * k
            q_bits += size * 8
            q_bits16 += tensor_bits(keys, tensors)[1]  # float tensors at 16 bits
        shape = f"{n}x{k}"
        shared = "" if size else " (shared)"
        print(f"  {name:56s} {shape:>12s} {info['packing']:14s} {info['bits']:>4d} "
              f"{size:>10d} {size * 8 / (n * k):7.3f}{shared}")

    aliases = meta["aliases"]
    head = meta.get("lm_head") or {"format": "fp"}
    if head["format"] == "packed":  # a layer of the table above (tied: the embedding's codes)
        info = meta["layers"].get(head.get("name"), {})
        owner = str(info.get("packed", "")).removesuffix(".packed")  # the stored copy's layer
        tied = [n for n, v in sorted(meta["layers"].items(), key=lambda kv: kv[0] != owner)
                if n != head.get("name") and v.get("packed") == info.get("packed")]
        print(f"lm_head: packed {info.get('packing')} ({head.get('name')}"
              + (f", shares the codes of {tied[0]}" if tied else "") + ")")
    head_keys = ([head["weight"], head["scale"]] if head["format"] == "int8"
                 else [aliases.get(f"{head.get('name')}.weight", f"{head.get('name')}.weight")])
    head_keys = [k for k in head_keys if k in tensors and k not in counted]
    head_bytes = sum(nbytes[k] for k in head_keys)
    head_params = _numel(tensors[head_keys[0]][1]) if head_keys else 0
    if head_keys:
        shape = "x".join(str(int(v)) for v in tensors[head_keys[0]][1])
        print(f"lm_head: {head['format']} ({head.get('name')}, {shape}, {_human(head_bytes)})")
        counted.update(head_keys)
    fp_keys = [k for k in tensors if k not in counted]
    fp_params = sum(_numel(tensors[k][1]) for k in fp_keys)
    fp_bytes = sum(nbytes[k] for k in fp_keys)
    total_params = q_params + fp_params + head_params
    total_bits = q_bits + fp_bytes * 8 + head_bytes * 8
    print(f"packed weights: {q_params} parameters, {_human(q_bits / 8)}")
    print(f"other full-precision tensors: {len(fp_keys)} tensors, {fp_params} values, "
          f"{_human(fp_bytes)}")
    if aliases:
        print(f"shared tensors stored once: {len(aliases)} aliases")
    print(f"file size: {_human(meta['path'].stat().st_size)}")
    if q_params:
        print(f"bits per parameter (quantized weights, scales included): {q_bits / q_params:.3f}")
        print(f"bits per weight as tbt ptq counts them (float scales at 16 bits): "
              f"{q_bits16 / q_params:.3f}")
    if total_params:
        print(f"bits per parameter (overall, incl. FP parts): {total_bits / total_params:.3f}")
    _print_adapters(args.directory, meta["layers"], q_params, q_bits)
    return 0


def _print_adapters(directory: str, layers: dict, q_params: int, q_bits: int) -> None:
    """EoRA adapters written next to the packed file by ``tbt ptq`` (docs/ptq.md): their cost."""
    import os

    path = os.path.join(directory, "eora_adapters.safetensors")
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    bits = 0
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        for key in keys:
            sl = f.get_slice(key)
            bits += _numel(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4) * 8
    names = {k.removesuffix(".lora_a") for k in keys if k.endswith(".lora_a")}
    covered = sum(_numel(info["shape"]) for name, info in layers.items() if name in names)
    print(f"EoRA adapters: {len(names)} layers, {_human(bits / 8)}, "
          f"{bits / max(covered, 1):.3f} bits per weight of the layers they correct")
    if q_params:
        print(f"bits per parameter (quantized weights + adapters): "
              f"{(q_bits + bits) / q_params:.3f}")
