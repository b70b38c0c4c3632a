"""Frozen, validated, JSON-round-trippable configuration for quantizing a model.

The paper writes a setting as "E-W-A": bits of the token **E**mbedding, of the **W**eights of every
linear layer, and of the **A**ctivations that enter those linears (and the attention matmuls).
``1`` means binary, ``2`` ternary, ``3..8`` n-bit, and ``fp`` (or ``32``/``16``) full precision.

>>> cfg = QuantConfig(bits="2-2-8")
>>> (cfg.embed_bits, cfg.weight_bits, cfg.act_bits)
(2, 2, 8)
>>> QuantConfig.from_json(cfg.to_json()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FP_SPELLINGS = ("fp", "32", "16", "none", "")
VARIANTS = ("paper", "released")  # of the weight and the activation quantizers
GRANULARITIES = ("row", "tensor", "group", "shard")  # tbt.quant.granularity

CONFIG_VERSION = 1


def _parse_bits_token(tok: str, what: str, full: str) -> int | None:
    t = tok.strip().lower()
    if t in FP_SPELLINGS:
        return None
    try:
        b = int(t)
    except ValueError:
        raise ValueError(
            f"bits={full!r}: the {what} part {tok!r} is not a number; write E-W-A with each part "
            f"in 1..8 or 'fp', e.g. '2-2-8', '1-1-1', '2-2-fp'"
        ) from None
    if b in (16, 32):
        return None
    if not 1 <= b <= 8:
        raise ValueError(
            f"bits={full!r}: {what} bits must be 1..8 or fp (32), got {b}; e.g. '2-2-8', '1-1-1'"
        )
    return b


def parse_bits(bits: str | int) -> tuple[int | None, int | None, int | None]:
    """Parse the paper's E-W-A notation into (embed_bits, weight_bits, act_bits); None = float."""
    s = str(bits).strip()
    if s.lower() in FP_SPELLINGS:
        return (None, None, None)
    parts = s.split("-")
    if len(parts) != 3:
        raise ValueError(
            f"bits={bits!r} is not in E-W-A form (embedding-weight-activation bits); "
            f"write e.g. '2-2-8' (ternary weights, 8-bit activations), '1-1-1' or 'fp'"
        )
    names = ("embedding", "weight", "activation")
    return tuple(_parse_bits_token(p, n, s) for p, n in zip(parts, names))  # type: ignore[return-value]


def _fmt(b: int | None) -> str:
    return "fp" if b is None else str(b)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model (see ``docs/numerics.md`` for every formula).

    Args:
        bits: E-W-A setting, e.g. ``"2-2-8"``; normalised on construction (``32`` -> ``fp``).
        method: weight quantizer for embeddings and linears: ``tbt``, ``twn``, ``bwn``,
            ``absmean``, ``uniform``, ``bitnet-binary``, ``trilm`` (stateless) or ``lsq``,
            ``seq``, ``seq-int2``, ``dlt``, ``dlt-centred``, ``tequila`` (per-layer modules);
            ``docs/methods.md``.
        variant: ``"paper"`` (Eq. 8-14: centred weights, clipped STE, zero-mean signed
            activations) or ``"released"`` (the authors' code, docs/numerics.md §5).
        granularity: ``"row"`` (one scale per output channel, TBT), ``"tensor"``, ``"group"``
            (``group_size`` inputs of a row) or ``"shard"`` (``num_shards`` blocks of rows);
            ``None`` uses the method's own (tensor for absmean/bitnet-binary, group for
            tequila, shard for trilm, row otherwise).
        group_size: inputs per scale with ``granularity="group"`` (must divide in_features).
        num_shards: row blocks with ``granularity="shard"`` (TriLM's model-parallel shards).
        method_options: the weight method's own settings, e.g. ``{"clip": 2.5}`` for ``twn``,
            ``{"lambda": 1e-3}`` for ``tequila``, ``{"salient_frac": 0.1}`` for ``pbllm``
            (each method declares its options, ``docs/methods.md``); stored with every option
            of the method, defaults filled in. The old top-level ``weight_clip``,
            ``tequila_lambda`` and ``salient_frac`` keys of saved configs and flat settings
            are read into it (:data:`LEGACY_OPTIONS`).
        act_method: ``"elastic"`` (learned α, TBT), ``"minmax"`` (dynamic 8-bit, DQ-BART),
            ``"absmax-token"`` (BitNet), ``"elastic-shift"`` (BiT), ``"lsq"``, ``"lsq-plus"``
            (:mod:`tbt.quant.act_methods`), or ``"auto"``: minmax for 8-bit activations,
            elastic below (the released recipe).
        act_clip: clip of the min/max activation quantizer, in activation units.
        quantize_attention: also quantize Q, K, V and the attention probabilities.
        skip_modules: fnmatch patterns of module names left in full precision.
        unsigned_inputs: fnmatch patterns of linears whose input is non-negative (after a
            GELU/ReLU); ``None`` picks the architecture's default (``fc2`` for BART ...).
    """

    bits: str = "2-2-8"
    method: str = "tbt"
    variant: str = "paper"
    granularity: str | None = None
    group_size: int = 128
    num_shards: int = 1
    method_options: Mapping[str, float] = ()  # type: ignore[assignment]  # stored as pairs
    act_method: str = "auto"
    act_clip: float = 2.5
    quantize_attention: bool = True
    skip_modules: tuple[str, ...] = ("lm_head",)
    unsigned_inputs: tuple[str, ...] | None = None
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        e, w, a = parse_bits(self.bits)
        object.__setattr__(self, "bits", f"{_fmt(e)}-{_fmt(w)}-{_fmt(a)}")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if self.unsigned_inputs is not None:
            object.__setattr__(self, "unsigned_inputs", tuple(self.unsigned_inputs))
        check_weight_fields(self.variant, self.granularity, self.group_size, self.num_shards)
        from tbt.quant.act_methods import check_act_method
        from tbt.quant.weight_registry import check_weight_method, get_weight_method

        for what, b in (("embedding", e), ("weight", w)):
            if b is not None:
                check_weight_method(self.method, b, what=f"{what} bits of bits={self.bits!r}")
        check_act_method(self.act_method, a)
        opts = self.method_options
        opts = dict(opts) if isinstance(opts, Mapping) else dict(tuple(p) for p in opts)
        if e is not None or w is not None:
            opts = get_weight_method(self.method).resolve_options(opts)
        elif opts:
            raise ValueError(f"method_options {sorted(opts)} apply to quantized weights; "
                             f"bits={self.bits!r} has none")
        object.__setattr__(self, "method_options", tuple(opts))
        if self.act_clip <= 0:
            raise ValueError("act_clip must be positive")
        if self.version > CONFIG_VERSION:
            raise ValueError(
                f"QuantConfig version {self.version} is newer than this tbt understands "
                f"({CONFIG_VERSION}); upgrade tbt"
            )

    # ---- derived views -------------------------------------------------------------------
    @property
    def embed_bits(self) -> int | None:
        return parse_bits(self.bits)[0]

    @property
    def weight_bits(self) -> int | None:
        return parse_bits(self.bits)[1]

    @property
    def act_bits(self) -> int | None:
        return parse_bits(self.bits)[2]

    @property
    def resolved_act_method(self) -> str:
        if self.act_method != "auto":
            return self.act_method
        return "minmax" if self.act_bits == 8 else "elastic"

    @property
    def options(self) -> dict[str, float]:
        """:attr:`method_options` as a dict."""
        return dict(self.method_options)

    def weight_spec(self, bits: int):
        """The :class:`~tbt.quant.weight.WeightSpec` of ``bits``-bit weights under this config."""
        from tbt.quant.weight import WeightSpec

        return WeightSpec(bits, self.method, self.variant, self.granularity, self.group_size,
                          self.num_shards, self.method_options)

    @classmethod
    def released(cls, bits: str = "2-2-8", **kw: Any) -> QuantConfig:
        """The released code (docs/numerics.md §5): no centring, identity STE, min shift."""
        return cls(bits=bits, method="tbt", variant="released", **kw)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method_options"] = self.options
        d["skip_modules"] = list(self.skip_modules)
        if self.unsigned_inputs is not None:
            d["unsigned_inputs"] = list(self.unsigned_inputs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        """The inverse of :meth:`to_dict`; reads the configs of older tbt versions too."""
        d = read_legacy_options(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"quant_method"})
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> QuantConfig:
        return cls.from_dict(json.loads(s))


# Top-level keys of older configs (and flat settings) -> the weight method option they set.
LEGACY_OPTIONS = {"weight_clip": "clip", "tequila_lambda": "lambda", "salient_frac": "salient_frac"}


def read_legacy_options(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with its :data:`LEGACY_OPTIONS` keys moved into ``method_options``.

    Older configs carry all three whatever the method: a key becomes an option only for a
    method that has that option (``weight_clip`` for ``twn`` ...). Given with
    ``method_options`` too (a saved config and a ``--tequila-lambda`` flag), the key wins: the
    flags are the last layer of the flat settings.
    """
    d = dict(d)
    legacy = {LEGACY_OPTIONS[k]: d.pop(k) for k in list(d) if k in LEGACY_OPTIONS}
    if not legacy:
        return d
    from tbt.quant.weight_registry import WEIGHT_METHODS

    entry = WEIGHT_METHODS.get(d.get("method", "tbt"))
    own = set(entry.options) if entry is not None else set()
    given = d.get("method_options") or {}
    opts = dict(given) if isinstance(given, Mapping) else dict(tuple(p) for p in given)
    opts.update({k: v for k, v in legacy.items() if k in own and v is not None})
    if opts:
        d["method_options"] = opts
    return d


def check_weight_fields(variant: str, granularity: str | None, group_size: int,
                        num_shards: int) -> None:
    """The checks of the weight fields that do not depend on the method (``QuantConfig`` and
    :class:`~tbt.quant.weight.WeightSpec` both run them); ``ValueError`` naming the fix."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; choose one of {list(VARIANTS)}")
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; choose one of "
                         f"{list(GRANULARITIES)} or None (the method's default)")
    for name, v in (("group_size", group_size), ("num_shards", num_shards)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
