"""The MatMul-free LM (Zhu et al. 2024; docs/related.md §17) as a small Hugging Face causal LM.

How it works
------------
A pre-norm residual stack of blocks, each ``x + MLGRU(RMSNorm(x))`` then ``x + GLU(RMSNorm(x))``,
an embedding, a final RMSNorm and an LM head. Every projection is a
:class:`~tbt.quant.bitlinear.BitLinear` (its own RMSNorm, then a linear), the **LM head too**.
The model is built in full precision; ``quantize_model(model, bitlinear_config())`` makes every
projection ternary (absmean, per tensor) with per-token int8 inputs, so that after training all
matrix products are ternary × int8: the packed ``t2a8`` format. ``tbt train --recipe
matmulfree-tiny`` does exactly that.

MLGRU token mixer (the released ``HGRNBitAttention``, ``num_heads=1``, ``expand_ratio=1``), per
token, all products element-wise:

* ``f_t = lb_l + (1 − lb_l)·σ(W_f x_t)``, with the layer's lower bound
  ``lb = cumsum(softmax(P, 0), 0) − softmax(P, 0)[0]`` over layers (``P (L, D)`` learnable, zero
  init; ``lb_0 = 0``, non-decreasing with depth, HGRN);
* ``i_t = SiLU(W_i x_t) ⊙ (1 − f_t)``; ``h_t = f_t ⊙ h_{t−1} + i_t``
  (:func:`~tbt.models.mlgru.mlgru_scan`);
* ``o_t = RMSNorm(W_g x_t) ⊙ SiLU(h_t)`` (the code's ``g_norm(g_proj(x), h)`` order), ``W_o o_t``.

GLU channel mixer (``HGRNBitMLP``): one BitLinear ``d → 2·d_ff`` split into ``(gate, y)``,
``W_down(SiLU(gate) ⊙ y)``; ``d_ff = 256·ceil(8/3·d/256)`` unless given.

Init as the released code: MLGRU projections xavier-uniform with gain ``2^−2.5``, the rest
``N(0, 0.02)``, ``o_proj``/``down_proj`` divided by ``√(2L)``, norms 1.

State and generation: the state is one ``(B, D)`` vector per layer (``O(1)`` in the sequence
length). ``forward(..., state=S)`` continues from ``S`` and returns the new state; ``generate``
is greedy decoding that feeds one token at a time with the state carried. It is tbt's own loop,
not transformers' ``GenerationMixin``: that machinery is built around KV ``Cache`` objects and
``cache_position``; a recurrent state would need a custom cache class for no gain here. Padding:
right padding only (a recurrence reads left to right; ``attention_mask`` is accepted and unused,
labels of padding must be ``-100``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers as tf
from torch import Tensor, nn
from transformers.modeling_outputs import ModelOutput

from tbt.models.mlgru import mlgru_scan
from tbt.quant.bitlinear import BitLinear

__all__ = ["MatMulFreeConfig", "MatMulFreeForCausalLM", "MatMulFreeOutput", "MODEL_TYPE"]

MODEL_TYPE = "tbt_matmulfree"


class MatMulFreeConfig(tf.PretrainedConfig):
    """Configuration of :class:`MatMulFreeForCausalLM` (defaults: the 370M model's width)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 1024,
                 num_hidden_layers: int = 24, intermediate_size: int | None = None,
                 rms_norm_eps: float = 1e-6, bitlinear_eps: float = 1e-8,
                 initializer_range: float = 0.02, max_position_embeddings: int = 2048,
                 pad_token_id: int | None = None, bos_token_id: int | None = 1,
                 eos_token_id: int | None = 2, tie_word_embeddings: bool = False, **kw) -> None:
        if intermediate_size is None:
            intermediate_size = 256 * math.ceil(8 * hidden_size / 3 / 256)
        for name, v in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                        ("num_hidden_layers", num_hidden_layers),
                        ("intermediate_size", intermediate_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        if tie_word_embeddings:
            raise ValueError("the MatMul-free LM's head is its own ternary BitLinear: "
                             "tie_word_embeddings must be False")
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.intermediate_size = num_hidden_layers, intermediate_size
        self.rms_norm_eps, self.bitlinear_eps = rms_norm_eps, bitlinear_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings  # data length cap only
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=False, **kw)


@dataclass
class MatMulFreeOutput(ModelOutput):
    """``loss`` (mean next-token CE when ``labels`` given), ``logits (B, T, V)``, ``state``
    (one ``(B, D)`` tensor per layer, to continue from), ``hidden_states`` (embedding output
    and every block's output, when asked)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    state: tuple[Tensor, ...] | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class MLGRU(nn.Module):
    """The MLGRU token mixer of one layer (module docstring)."""

    def __init__(self, cfg: MatMulFreeConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.bitlinear_eps
        self.i_proj, self.f_proj, self.g_proj, self.o_proj = (BitLinear(d, d, eps)
                                                              for _ in range(4))
        self.g_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)

    def forward(self, x: Tensor, lower_bound: Tensor, state: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        f = torch.sigmoid(self.f_proj(x))                        # (B, T, D)
        f = lower_bound + (1 - lower_bound) * f
        i = F.silu(self.i_proj(x)) * (1 - f)
        h = mlgru_scan(f, i, state)                              # (B, T, D)
        o = self.g_norm(self.g_proj(x)) * F.silu(h)
        return self.o_proj(o), h[:, -1]


class GLU(nn.Module):
    """The gated SiLU channel mixer: ``down(SiLU(gate) ⊙ y)``, ``(gate, y) = gate_proj(x)``."""

    def __init__(self, cfg: MatMulFreeConfig) -> None:
        super().__init__()
        d, ff, eps = cfg.hidden_size, cfg.intermediate_size, cfg.bitlinear_eps
        self.gate_proj = BitLinear(d, 2 * ff, eps)
        self.down_proj = BitLinear(ff, d, eps)

    def forward(self, x: Tensor) -> Tensor:
        gate, y = self.gate_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * y)


class MatMulFreeBlock(nn.Module):
    def __init__(self, cfg: MatMulFreeConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = MLGRU(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = GLU(cfg)

    def forward(self, x: Tensor, lower_bound: Tensor, state: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        mixed, new_state = self.attn(self.attn_norm(x), lower_bound, state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), new_state


class MatMulFreeForCausalLM(tf.PreTrainedModel):
    """The MatMul-free causal LM (module docstring). ``forward`` as any HF causal LM, plus
    ``state``; ``generate`` is greedy with the recurrent state carried."""

    config_class = MatMulFreeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MatMulFreeBlock"]

    def __init__(self, config: MatMulFreeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         config.pad_token_id)
        self.layers = nn.ModuleList(MatMulFreeBlock(config)
                                    for _ in range(config.num_hidden_layers))
        self.lower_bounds = nn.Parameter(torch.zeros(config.num_hidden_layers, config.hidden_size))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = BitLinear(config.hidden_size, config.vocab_size, config.bitlinear_eps)
        self.post_init()
        self.reset_parameters()

    def _init_weights(self, module: nn.Module) -> None:  # init is reset_parameters (explicit)
        pass

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released code's initialisation (module docstring)."""
        std, depth = self.config.initializer_range, self.config.num_hidden_layers
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, nn.RMSNorm):
                m.weight.fill_(1.0)
        for layer in self.layers:
            for p in (layer.attn.i_proj, layer.attn.f_proj, layer.attn.g_proj, layer.attn.o_proj):
                nn.init.xavier_uniform_(p.proj.weight, gain=2 ** -2.5)
            layer.attn.o_proj.proj.weight.div_(math.sqrt(2 * depth))
            layer.mlp.down_proj.proj.weight.div_(math.sqrt(2 * depth))
        self.lower_bounds.zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> None:  # a ternary BitLinear, never tied
        return None

    def layer_lower_bounds(self) -> Tensor:
        """``lb (L, D)``: ``cumsum(softmax(P, 0), 0) − softmax(P, 0)[0]``; ``lb_0 = 0``."""
        p = self.lower_bounds.softmax(dim=0)
        return p.cumsum(dim=0) - p[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, state: tuple[Tensor, ...] | None = None,
                output_hidden_states: bool = False, return_dict: bool | None = None,
                **unused) -> MatMulFreeOutput:
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state has {len(state)} tensors; the model has {len(self.layers)} "
                             "layers: pass the state a previous forward returned")
        x = self.embed_tokens(input_ids)                         # (B, T, D)
        lb = self.layer_lower_bounds()
        hidden = [x] if output_hidden_states else None
        new_state = []
        for n, layer in enumerate(self.layers):
            x, s = layer(x, lb[n], None if state is None else state[n])
            new_state.append(s)
            if hidden is not None:
                hidden.append(x)
        logits = self.lm_head(self.norm(x))                      # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return MatMulFreeOutput(loss=loss, logits=logits, state=tuple(new_state),
                                hidden_states=None if hidden is None else tuple(hidden))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 eos_token_id: int | None = None, attention_mask: Tensor | None = None,
                 **kwargs) -> Tensor:
        """Greedy decoding with the recurrent state carried: the prompt runs once, then one
        token per step. Returns ``(B, T + new)``; rows that reached EOS are padded with it."""
        if kwargs.get("num_beams", 1) != 1 or kwargs.get("do_sample", False):
            raise ValueError("MatMulFreeForCausalLM.generate is greedy only (num_beams=1, "
                             "do_sample=False)")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        out = self(input_ids=input_ids)
        tokens, state = [input_ids], out.state
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = out.logits[:, -1]
        for step in range(max_new_tokens):
            if eos is not None and step < min_new_tokens:
                logits = logits.clone()
                logits[:, eos] = float("-inf")
            nxt = logits.argmax(dim=-1)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            tokens.append(nxt[:, None])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            out = self(input_ids=nxt[:, None], state=state)
            logits, state = out.logits[:, -1], out.state
        return torch.cat(tokens, dim=1)


def _register() -> None:
    try:
        tf.AutoConfig.register(MODEL_TYPE, MatMulFreeConfig)
        tf.AutoModelForCausalLM.register(MatMulFreeConfig, MatMulFreeForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register()
