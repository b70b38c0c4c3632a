"""Model surgery: convert a Hugging Face model to TBT fake-quantization *in place*.

``quantize_model(model, QuantConfig(bits="2-2-8"))`` does three things and nothing else:

1. every ``nn.Linear`` (and transformers' ``Conv1D``) whose name matches no ``skip_modules``
   pattern becomes a :class:`~tbt.quant.modules.QuantLinear` that *shares* the original Parameters;
   its input quantizer is non-negative for the architecture's post-GELU/ReLU linears (``fc2`` in
   BART) and signed elsewhere (docs/numerics.md §2a);
2. the token-embedding modules (every ``nn.Embedding`` holding the input-embedding Parameter; BART
   has three) become :class:`~tbt.quant.modules.QuantEmbedding`; positional and relative-position
   embeddings stay in full precision;
3. each attention module gets ``tbt_attn`` quantizers for Q, K, V and the probabilities, and the
   model's attention implementation is switched to the registered ``"tbt_eager"`` function.

The LM head is skipped by default; with tied embeddings it keeps projecting with the FP latent
matrix the embedding lookup quantizes (the released code's behaviour). The config lands in
``model.config.quantization_config`` so ``save_pretrained``/``from_pretrained`` rebuild the model.
"""

from __future__ import annotations

import fnmatch
import logging

from torch import nn

from tbt.config import QuantConfig
from tbt.quant.act_methods import make_act_quantizer
from tbt.quant.activation import ElasticQuantizer, MinMaxQuantizer
from tbt.quant.attention import AttentionQuantizers, register_attention
from tbt.quant.modules import QuantEmbedding, QuantLinear
from tbt.quant.weight_learned import make_weight_quantizer

logger = logging.getLogger(__name__)

# Linears whose input is the output of a GELU/ReLU (non-negative up to GELU's -0.17 dip), by
# model_type. Gated MLPs (Llama, Qwen2, Mistral, T5 v1.1) multiply by a signed branch: signed.
UNSIGNED_INPUTS: dict[str, tuple[str, ...]] = {
    "bart": ("*fc2",), "mbart": ("*fc2",), "marian": ("*fc2",), "pegasus": ("*fc2",),
    "plbart": ("*fc2",), "blenderbot": ("*fc2",), "blenderbot-small": ("*fc2",),
    "gpt2": ("*mlp.c_proj",), "opt": ("*fc2",),
    "t5": ("*DenseReluDense.wo",), "mt5": ("*DenseReluDense.wo",),
}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p)
               for p in patterns)


def _unsigned_patterns(model: nn.Module, cfg: QuantConfig) -> tuple[str, ...]:
    if cfg.unsigned_inputs is not None:
        return cfg.unsigned_inputs
    hf_cfg = getattr(model, "config", None)
    mtype = getattr(hf_cfg, "model_type", None)
    if mtype in ("t5", "mt5") and getattr(hf_cfg, "is_gated_act", False):
        return ()
    return UNSIGNED_INPUTS.get(mtype, ())


__all__ = ["quantize_model", "quantized_modules", "make_act_quantizer", "UNSIGNED_INPUTS"]


def _weight_quant(cfg: QuantConfig, bits: int | None, param: nn.Parameter, transposed: bool,
                  shared: dict[int, object]):
    """The weight quantizer of one layer: a WeightSpec for stateless methods, a module built
    from this layer's latent ``(out, in)`` weight for learned ones (the registry decides).
    Layers sharing one Parameter (tied embeddings) share one quantizer."""
    if bits is None:
        return None
    if id(param) not in shared:
        shared[id(param)] = make_weight_quantizer(cfg, bits, param.t() if transposed else param)
    return shared[id(param)]


def _is_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # transformers' GPT-2 Conv1D


def _token_embedding_names(model: nn.Module) -> set[str]:
    """Names of the input-embedding module and every embedding tied to it.

    Ties are read from the model's declaration (``all_tied_weights_keys``) as well as from
    Parameter identity: inside ``from_pretrained`` the model is built on the meta device and tied
    only *after* the weights load, so identity alone would miss BART's encoder/decoder copies.
    """
    emb = model.get_input_embeddings()
    names = {n for n, m in model.named_modules() if m is emb}
    names |= {n for n, m in model.named_modules()
              if isinstance(m, nn.Embedding) and m.weight is emb.weight}
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict):
        grown = True
        while grown:  # transitive closure: encoder.embed_tokens -> shared -> decoder.embed_tokens
            targets = {f"{n}.weight" for n in names}
            new = {k.removesuffix(".weight") for dst, src in tied.items()
                   if src in targets or dst in targets for k in (dst, src)}
            grown = not new <= names
            names |= new
    return names


def _is_attention(mod: nn.Module) -> bool:
    name = type(mod).__name__
    return name.endswith("Attention") and any(_is_linear(c) or isinstance(c, QuantLinear)
                                              for c in mod.children())


def quantize_model(model: nn.Module, config: QuantConfig | str) -> nn.Module:
    """Convert ``model`` in place to TBT fake quantization; returns it for chaining.

    Args:
        model: a transformers ``PreTrainedModel`` (any architecture whose attention uses the
            attention interface) or any ``nn.Module`` with Linear/Embedding layers.
        config: a :class:`~tbt.QuantConfig` or an E-W-A string such as ``"2-2-8"``.

    Raises:
        ValueError: the model is already quantized, or nothing matched.
    """
    cfg = QuantConfig(bits=config) if isinstance(config, str) else config
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ValueError("model is already quantized (it contains QuantLinear/QuantEmbedding)")
    unsigned = _unsigned_patterns(model, cfg)
    n_lin = n_emb = n_attn = 0
    shared: dict[int, object] = {}

    if cfg.embed_bits is not None and hasattr(model, "get_input_embeddings"):
        token_embeddings = _token_embedding_names(model)
        for name, mod in list(model.named_modules()):
            if (isinstance(mod, nn.Embedding) and name in token_embeddings
                    and not _matches(name, cfg.skip_modules)):
                spec = _weight_quant(cfg, cfg.embed_bits, mod.weight, False, shared)
                model.set_submodule(name, QuantEmbedding.from_float(mod, spec))
                n_emb += 1

    for name, mod in list(model.named_modules()):
        if not _is_linear(mod) or _matches(name, cfg.skip_modules):
            continue
        transposed = not isinstance(mod, nn.Linear)  # GPT-2 Conv1D stores (in, out)
        in_features = mod.weight.shape[0] if transposed else mod.weight.shape[1]
        act = make_act_quantizer(cfg, not _matches(name, unsigned), int(in_features))
        w_quant = _weight_quant(cfg, cfg.weight_bits, mod.weight, transposed, shared)
        model.set_submodule(name, QuantLinear.from_float(mod, w_quant, act))
        n_lin += 1

    if cfg.quantize_attention and cfg.act_bits is not None:
        for name, mod in list(model.named_modules()):
            if _is_attention(mod) and not _matches(name, cfg.skip_modules):
                head_dim = getattr(mod, "head_dim", None)  # Q/K/V channels (BiT's shift)
                mod.tbt_attn = AttentionQuantizers(
                    make_act_quantizer(cfg, True, head_dim), make_act_quantizer(cfg, True, head_dim),
                    make_act_quantizer(cfg, True, head_dim), make_act_quantizer(cfg, False),
                )
                n_attn += 1

    if n_lin + n_emb == 0:
        raise ValueError("quantize_model found no Linear/Embedding to convert; check skip_modules")
    _attach_config(model, cfg)
    logger.info("tbt: quantized %d linears, %d embeddings, %d attentions at %s (%s/%s)",
                n_lin, n_emb, n_attn, cfg.bits, cfg.method, cfg.variant)
    return model


def _attach_config(model: nn.Module, cfg: QuantConfig) -> None:
    hf_cfg = getattr(model, "config", None)
    if hf_cfg is None:
        return
    impl = register_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        hf_cfg._attn_implementation = impl
    from tbt.quant.hf_quantizer import TbtQuantizationConfig, register_hf_quantizer

    register_hf_quantizer()
    hf_cfg.quantization_config = TbtQuantizationConfig.from_quant_config(cfg)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every quantized layer and activation quantizer (for inspection)."""
    from tbt.quant.act_methods import AbsmaxTokenQuantizer
    from tbt.quant.weight_learned import WeightQuantizer

    kinds = (QuantLinear, QuantEmbedding, ElasticQuantizer, MinMaxQuantizer, AbsmaxTokenQuantizer,
             WeightQuantizer)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
