"""Training configuration: frozen, validated dataclasses with a JSON round trip.

A training run is described by one :class:`TrainConfig`, which nests the
:class:`~tbt.config.QuantConfig` of the student (``None`` = full-precision training), the
:class:`~tbt.data.DataConfig` of the text and the :class:`DistillConfig` of the loss.

Configs come from three layers, later ones winning: a named recipe
(:data:`tbt.train.presets.RECIPES`), a config file (``--config run.toml`` or ``.json``), and
command-line flags. All three speak the same *flat* vocabulary -- the field names, which are
unique across the nested configs (``bits``, ``train_file``, ``w_attn``, ``lr`` ...) -- and
:meth:`TrainConfig.from_flat` routes each key to its owner. A config file may also use the
nested form that :meth:`TrainConfig.to_dict` writes (``[quant]``, ``[data]``, ``[distill]``
tables), so the ``train_config.json`` saved with every checkpoint is itself a valid ``--config``.

>>> cfg = TrainConfig.from_flat({"model": "bart-tiny", "bits": "2-2-8", "train_file": "t.jsonl",
...                              "output_dir": "out", "max_steps": 10, "tokenizer": "tok"})
>>> TrainConfig.from_json(cfg.to_json()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tbt.config import LEGACY_OPTIONS, QuantConfig, parse_bits
from tbt.data import DataConfig

TRAIN_CONFIG_VERSION = 1
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistillConfig:
    """The distillation loss: ``Σ_k w_k · term_k`` (docs/recipe.md §2).

    Args:
        w_ce: label cross-entropy (the model's own LM loss; ``-100`` labels ignored).
        w_logits: soft cross-entropy between teacher and student token distributions.
        w_hidden: hidden-state MSE, summed over the embedding output and every layer of each
            stack (encoder and decoder; the one stack of a causal LM).
        w_attn: post-softmax attention-probability MSE, summed over layers of encoder self,
            decoder self and cross attention (causal LM: self attention).
        temperature: softmax temperature of the logit term (reference: 1, no T² factor).
        mask_padding: average every term over real tokens only. ``False`` reproduces the
            released code, which averages over padded positions too (docs/recipe.md §2).
        last_encoder_twice: add the released code's extra term
            ``Σ_b MSE(s_last[b], t_last[b])`` on the last encoder state (a sum over examples, so
            it counts that state again, ×B; docs/recipe.md §2). Seq2seq only.
        layer_map: for each student layer of the decoder (causal LM: the only stack), the index
            of its teacher layer; ``None`` = identity (student and teacher same depth).
        encoder_layer_map: the same for the encoder; ``None`` = identity.
        w_off: TernaryLLM's OFF term, ``1 − cos`` between hidden states, over the same layers
            as ``w_hidden`` (docs/related.md §6b).
        w_attn_scores: TernaryBERT's MSE between pre-softmax attention scores, over the same
            attentions as ``w_attn`` (docs/related.md §4a).
        w_relation: MiniLM/BitDistill Q-Q, K-K, V-V relation KL, summed over the three and over
            ``relation_layers`` of each self-attention stack (docs/related.md §10).
        relation_layers: student layers of the relation term (negative counts from the end;
            default ``(-1,)``: the last layer, MiniLMv2's choice); ``None`` (or ``"all"``) =
            every layer.
        relation_heads: relation heads ``A`` the Q/K/V features are regrouped into; ``None`` =
            the model's own heads (student and teacher must then have the same count).
    """

    w_ce: float = 1.0
    w_logits: float = 1.0
    w_hidden: float = 1.0
    w_attn: float = 1.0
    temperature: float = 1.0
    mask_padding: bool = True
    last_encoder_twice: bool = False
    layer_map: tuple[int, ...] | None = None
    encoder_layer_map: tuple[int, ...] | None = None
    w_off: float = 0.0
    w_attn_scores: float = 0.0
    w_relation: float = 0.0
    relation_layers: tuple[int, ...] | None = (-1,)
    relation_heads: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("w_ce", "w_logits", "w_hidden", "w_attn", *EXTRA_WEIGHTS):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name}={v!r}: loss weights must be numbers >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        for name in ("layer_map", "encoder_layer_map"):
            v = getattr(self, name)
            if v is not None:
                v = _int_tuple(v, name)
                if any(i < 0 for i in v):
                    raise ValueError(f"{name}={list(v)}: teacher layer indices must be >= 0")
                object.__setattr__(self, name, v)
        if isinstance(self.relation_layers, str) and self.relation_layers.lower() == "all":
            object.__setattr__(self, "relation_layers", None)
        if self.relation_layers is not None:
            v = _int_tuple(self.relation_layers, "relation_layers")
            if not v:
                raise ValueError("relation_layers is empty: give layer indices such as '-1' "
                                 "or leave it unset")
            object.__setattr__(self, "relation_layers", v)
        if self.relation_heads is not None and (not isinstance(self.relation_heads, int)
                                                or self.relation_heads < 1):
            raise ValueError(f"relation_heads={self.relation_heads!r} must be an integer >= 1 "
                             f"(or unset: the model's own heads)")

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(self, f"w_{k}") > 0 for k in ("logits", "hidden", "attn")) or \
            any(getattr(self, k) > 0 for k in EXTRA_WEIGHTS)

    @property
    def needs_capture(self) -> bool:
        """Whether a term reads Q/K/V or scores inside the attention (``"tbt_eager"``)."""
        return self.w_attn_scores > 0 or self.w_relation > 0


EXTRA_WEIGHTS = ("w_off", "w_attn_scores", "w_relation")  # terms beyond the TBT recipe


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (:func:`tbt.train.loop.train`).

    Args:
        output_dir: final model, ``log.jsonl``, ``train_config.json`` and ``checkpoints/``.
        model: the student's starting point: a hub name, a local checkpoint, or an architecture
            preset (``bart-tiny``, ``bart-small``, ``gpt2-tiny``) trained from scratch. ``None``
            with ``teacher`` set: the student is a copy of the teacher.
        teacher: full-precision teacher (hub name or directory). ``None`` with quantized
            ``bits``: the teacher is a full-precision copy of ``model`` (the TBT recipe: both
            start from one fine-tuned checkpoint). ``None`` with ``quant=None``: plain CE training.
        tokenizer: tokenizer directory; default: the teacher's, else the model's.
        quant: the student's quantization; ``None`` = full precision (``--bits fp``).
        data, distill: see :class:`~tbt.data.DataConfig`, :class:`DistillConfig`.
        max_steps / epochs: optimizer steps, or passes over the training set (exactly one).
        lr, weight_decay, warmup_ratio, adam_betas, adam_eps: AdamW with a linear warmup then
            linear decay to 0 (reference: eps 1e-6, no weight decay, warmup 5 %).
        batch_size: examples per process per micro-batch; ``grad_accum`` micro-batches per
            optimizer step, so the effective batch is ``batch_size · grad_accum · processes``.
        max_grad_norm: gradient clipping (``0`` = off).
        bf16: bfloat16 autocast (CPU, or a CUDA device that supports it).
        device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
        seed: seeds initialisation, data order and dropout.
        save_every: checkpoint every N optimizer steps (``0`` = only at the end);
            ``keep_checkpoints`` most recent are kept.
        eval_every: validation loss every N steps (``0`` = only at the end; needs a
            validation file).
        log_every: steps between progress-bar updates of the loss.
        resume: continue from the last checkpoint in ``output_dir/checkpoints``.
        early_stop_patience: ``> 0`` stops training once the validation loss (taken every
            ``eval_every`` steps) has not improved on its best by more than
            ``early_stop_min_delta`` for this many consecutive validations: the run ends at
            that step (checkpointed like the last step), under the ``max_steps``/``epochs``
            cap. ``0`` = off.
        early_stop_min_delta: the improvement that counts (absolute, in loss units).
        recipe: the recipe this config was built from (informational).
        generation: a :data:`tbt.eval.evaluate.GENERATION_PRESETS` name written into the saved
            model's generation config (``None`` = leave the model's own).
        progress: show tqdm progress bars.
        lrqat_rank: ``> 0`` trains the quantized student with LR-QAT (``docs/lrqat.md``): frozen
            int8 grid-unit weights plus a rank-``lrqat_rank`` update inside the rounding and a
            learnable row scale; the result is merged into ``output_dir/packed``. ``0`` = full QAT.
        lrqat_alpha, lrqat_storage, lrqat_checkpoint: the update scaling ``alpha/rank``, how the
            frozen weight is stored (``int8``, ``bfloat16``, ``float32``) and activation
            checkpointing of the LR-QAT layers (:class:`tbt.quant.lrqat.LRQATConfig`).
        lrqat_scale_lr: learning rate of the LR-QAT scale group (row scales, activation α;
            :func:`tbt.quant.lrqat.lrqat_parameters`), the factors A, B keeping ``lr``
            (docs/related.md §16: separate learning rates). ``None`` = ``lr`` (one group).
        copy_warmup_steps: before the run, train a seq2seq student this many AdamW steps on
            the synthetic copy task (:func:`tbt.train.warmup.copy_warmup_batch`: random tokens,
            the target is their first part) so that it learns to read its input through
            cross attention; ``0`` = none. Preset architectures trained from scratch default
            to 400 (:func:`tbt.train.presets.scratch_defaults`); it stops early once the model
            copies (:func:`tbt.train.warmup.copy_warmup`). Skipped on ``resume``.
        copy_warmup_lr, copy_warmup_batch_size: the warm-up's constant learning rate and batch.

    Training from scratch: :meth:`from_flat` fills the preset's own defaults
    (:data:`tbt.train.presets.SCRATCH_DEFAULTS`) for settings not given, when ``model`` is an
    architecture preset; constructing ``TrainConfig(...)`` directly does not.
    """

    output_dir: str
    model: str | None = None
    teacher: str | None = None
    tokenizer: str | None = None
    quant: QuantConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    max_steps: int | None = None
    epochs: float | None = None
    lr: float = 2.5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-6
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = False
    device: str = "auto"
    seed: int = 28
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 1
    resume: bool = False
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    recipe: str | None = None
    generation: str | None = None
    progress: bool = True
    lrqat_rank: int = 0
    lrqat_alpha: float = 1.0
    lrqat_storage: str = "int8"
    lrqat_checkpoint: bool = False
    lrqat_scale_lr: float | None = None
    copy_warmup_steps: int = 0
    copy_warmup_lr: float = 1e-3
    copy_warmup_batch_size: int = 32
    version: int = TRAIN_CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        if not self.output_dir:
            raise ValueError("output_dir is required: pass --output-dir DIR")
        if self.model is None and self.teacher is None:
            raise ValueError("no model: pass --model (hub name, checkpoint or preset such as "
                             "bart-tiny) and/or --teacher DIR")
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of --max-steps N and --epochs N")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be > 0")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.early_stop_patience < 0 or self.early_stop_min_delta < 0:
            raise ValueError("early_stop_patience and early_stop_min_delta must be >= 0")
        if self.early_stop_patience and not self.eval_every:
            raise ValueError("early stopping needs validations: set --eval-every N (and a "
                             "validation file)")
        for name in ("save_every", "eval_every", "copy_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not self.copy_warmup_lr > 0 or self.copy_warmup_batch_size < 1:
            raise ValueError(f"copy_warmup_lr={self.copy_warmup_lr} must be > 0 and "
                             f"copy_warmup_batch_size={self.copy_warmup_batch_size} >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas={self.adam_betas} must be two numbers in [0, 1)")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: choose one of {list(DEVICES)}")
        if self.generation is not None:
            from tbt.eval.evaluate import GENERATION_PRESETS

            if self.generation not in GENERATION_PRESETS:
                raise ValueError(f"generation={self.generation!r}: choose one of "
                                 f"{list(GENERATION_PRESETS)}")
        if self.lrqat_rank:
            if self.quant is None or self.quant.weight_bits not in (1, 2):
                raise ValueError(f"lrqat_rank={self.lrqat_rank} needs ternary or binary weights "
                                 f"(e.g. --bits 2-2-8); bits={self.bits}")
            _ = self.lrqat  # validates the LR-QAT settings
        if self.lrqat_scale_lr is not None:
            if not self.lrqat_rank:
                raise ValueError("lrqat_scale_lr applies to LR-QAT only: add --lrqat-rank R "
                                 "or drop --lrqat-scale-lr")
            if not self.lrqat_scale_lr > 0:
                raise ValueError(f"lrqat_scale_lr={self.lrqat_scale_lr} must be > 0")
        if self.version > TRAIN_CONFIG_VERSION:
            raise ValueError(f"TrainConfig version {self.version} is newer than this tbt "
                             f"understands ({TRAIN_CONFIG_VERSION}); upgrade tbt")

    @property
    def lrqat(self):
        """The :class:`~tbt.quant.lrqat.LRQATConfig` of the run, or ``None`` (full QAT)."""
        if not self.lrqat_rank:
            return None
        from tbt.quant.lrqat import LRQATConfig

        return LRQATConfig(rank=self.lrqat_rank, alpha=self.lrqat_alpha,
                           storage=self.lrqat_storage, checkpoint=self.lrqat_checkpoint)

    @property
    def bits(self) -> str:
        return "fp" if self.quant is None else self.quant.bits

    # ---- nested JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["quant"] = None if self.quant is None else self.quant.to_dict()
        d["data"] = self.data.to_dict()
        d["distill"] = _lists(dataclasses.asdict(self.distill))
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        d = dict(d)
        _check_keys(cls, d, "TrainConfig")
        if d.get("quant") is not None and not isinstance(d["quant"], QuantConfig):
            d["quant"] = QuantConfig.from_dict(d["quant"])
        if isinstance(d.get("data"), Mapping):
            _check_keys(DataConfig, d["data"], "DataConfig")
            d["data"] = DataConfig(**d["data"])
        if isinstance(d.get("distill"), Mapping):
            _check_keys(DistillConfig, d["distill"], "DistillConfig")
            d["distill"] = DistillConfig(**d["distill"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> TrainConfig:
        return cls.from_dict(json.loads(s))

    # ---- flat vocabulary (recipes, config files, flags) -------------------------------------
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> TrainConfig:
        """Build from flat ``name: value`` pairs (``bits`` = ``"fp"`` or E-W-A, plus any field
        of TrainConfig, DataConfig, DistillConfig or QuantConfig, ``version`` excepted).

        With ``model`` an architecture preset, the preset's from-scratch defaults
        (:func:`tbt.train.presets.scratch_defaults`) fill the settings ``flat`` leaves out."""
        from tbt.train.presets import scratch_defaults

        flat = {k.replace("-", "_"): v for k, v in flat.items()}
        flat = {**scratch_defaults(flat), **flat}
        owners = _flat_owners()
        check_setting_types(flat)
        parts: dict[str, dict[str, Any]] = {"train": {}, "quant": {}, "data": {}, "distill": {}}
        for key, value in flat.items():
            key = key.replace("-", "_")
            parts[owners[key]][key] = value
        quant = parts["quant"]
        bits = str(quant.pop("bits", "fp"))
        if all(b is None for b in parse_bits(bits)):
            if quant:
                raise ValueError(f"{sorted(quant)} only apply to quantized students; "
                                 f"--bits is fp")
            q = None
        else:
            q = QuantConfig.from_dict({"bits": bits, **quant})
        parts["train"].setdefault("output_dir", "")  # -> "output_dir is required"
        return cls(quant=q, data=DataConfig(**parts["data"]),
                   distill=DistillConfig(**parts["distill"]), **parts["train"])

    def to_flat(self) -> dict[str, Any]:
        """The inverse of :meth:`from_flat` (defaults included)."""
        d = self.to_dict()
        flat = {k: v for k, v in d.items() if k not in ("quant", "data", "distill", "version")}
        flat["bits"] = self.bits
        if self.quant is not None:
            flat.update({k: v for k, v in d["quant"].items() if k not in ("bits", "version")})
        for part in ("data", "distill"):
            flat.update({k: v for k, v in d[part].items() if k != "version"})
        return flat


# Settings that exclude each other: a layer that sets one member of a group drops the others
# from the layers below it (``--max-steps`` over a recipe's ``epochs``, local files over a
# recipe's hub dataset).
EXCLUSIVE = (
    ({"max_steps"}, {"epochs"}),
    ({"dataset", "dataset_config"}, {"train_file", "validation_file", "test_file"}),
)


def merge_settings(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge flat settings, later layers winning (recipe, config file, flags)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        layer = {k.replace("-", "_"): v for k, v in layer.items()}
        for group in EXCLUSIVE:
            for side, other in (group, group[::-1]):
                if side & layer.keys():
                    for k in other - layer.keys():
                        merged.pop(k, None)
        merged.update(layer)
    return merged


def _flat_owners() -> dict[str, str]:
    owners: dict[str, str] = {}
    for owner, klass in (("train", TrainConfig), ("quant", QuantConfig), ("data", DataConfig),
                         ("distill", DistillConfig)):
        for f in dataclasses.fields(klass):
            if f.name in ("version", "quant", "data", "distill"):
                continue
            assert f.name not in owners, f"setting {f.name!r} is ambiguous"
            owners[f.name] = owner
    owners.update(dict.fromkeys(LEGACY_OPTIONS, "quant"))  # --tequila-lambda, --salient-frac
    return owners


def _setting_types() -> dict[str, str]:
    """Flat setting name -> its annotation (``"float"``, ``"int | None"``, ...)."""
    types = {"bits": "str"}
    for klass in (TrainConfig, QuantConfig, DataConfig, DistillConfig):
        for f in dataclasses.fields(klass):
            if f.name not in ("version", "quant", "data", "distill"):
                types[f.name] = f.type if isinstance(f.type, str) else getattr(
                    f.type, "__name__", str(f.type))
    types.update(dict.fromkeys(LEGACY_OPTIONS, "float"))  # --tequila-lambda, --salient-frac
    return types


def _type_ok(value: Any, annotation: str) -> str | None:
    """``None`` if ``value`` fits ``annotation``, else what was expected (for the message)."""
    alternatives = [a.strip() for a in annotation.split("|")]
    if value is None:
        return None if "None" in alternatives else "a value (it cannot be empty)"
    wanted = []
    for a in alternatives:
        if a == "None":
            continue
        if a == "bool":
            ok, what = isinstance(value, bool), "true or false"
        elif a == "int":
            ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif a == "float":
            ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif a == "str":
            ok, what = isinstance(value, str), "a string"
        elif a.startswith("tuple[float"):
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            what = "a list of numbers"
        elif a.startswith("tuple["):  # layer lists and patterns: a list, or a string to parse
            ok, what = isinstance(value, (list, tuple, str)), "a list (or a string)"
        else:
            ok, what = True, a
        if ok:
            return None
        wanted.append(what)
    return " or ".join(wanted)


def check_setting_types(flat: Mapping[str, Any], where: str = "") -> None:
    """Raise ``ValueError`` (one line) for an unknown flat setting or one of the wrong type,
    e.g. ``lr = "abc"`` in a config file; ``where`` names the source for the message."""
    types = _setting_types()
    src = f" in {where}" if where else ""
    for key, value in flat.items():
        key = key.replace("-", "_")
        if key not in types:
            raise ValueError(f"unknown setting {key!r}{src}; valid settings: "
                             f"{', '.join(sorted(types))}")
        wanted = _type_ok(value, types[key])
        if wanted is not None:
            raise ValueError(f"setting {key} = {value!r}{src}: expected {wanted}")


def flatten_config(d: Mapping[str, Any]) -> dict[str, Any]:
    """A config-file mapping in flat or nested form (``quant``/``data``/``distill`` tables,
    as :meth:`TrainConfig.to_dict` writes) -> flat settings."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        key = key.replace("-", "_")
        if key in ("quant", "data", "distill") and isinstance(value, Mapping):
            flat.update({k.replace("-", "_"): v for k, v in value.items() if k != "version"})
        elif key == "quant" and value is None:
            flat["bits"] = "fp"
        elif key != "version":
            flat[key] = value
    return flat


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` config file into flat settings (see module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if ext == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
        elif ext == ".json":
            data = json.loads(raw)
        else:
            raise ValueError(f"config file {path!r}: use a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as e:
        if "use a .toml" in str(e):
            raise
        raise ValueError(f"config file {path!r} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a table/object of settings")
    flat = flatten_config(data)
    check_setting_types(flat, f"config file {path}")
    return flat


def _check_keys(klass: type, d: Mapping[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid fields: {sorted(names)}")


def _int_tuple(v: Any, name: str) -> tuple[int, ...]:
    if isinstance(v, str):
        v = [x for x in v.replace(",", " ").split()]
    try:
        return tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={v!r}: give teacher layer indices, e.g. '0,2,4'") from None


def _lists(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
