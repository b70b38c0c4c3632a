"""Numpy reference of the native engine's step (``csrc/engine.c``), for tests and debugging.

The same model as :class:`tbt.runtime.engine.Engine` (it reuses the engine's loaded weights
and quantizer descriptions), written plainly in numpy: RMSNorm, RoPE, grouped-query attention
with the Q/K/V/probability fake quantizers applied to the *whole* cache every step (no
incremental re-quantization), SiLU MLP, the LM head. The packed linears run through
:class:`~tbt.runtime.linear.PackedLinearNP` on the numpy reference kernels (``backend="ref"``)
unless told otherwise. Float steps are float32 numpy operations in torch's order; reductions
accumulate in float64, as the C code does. ``trace`` (a callable) receives
``(site, layer, array)`` for each quantizer input, to locate a difference.

Torch-free, like the rest of ``tbt.runtime``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tbt.runtime.engine import Engine, _AQ, _Linear
from tbt.runtime.linear import PackedLinearNP

__all__ = ["EngineReference", "fake_quant", "rmsnorm", "rope", "silu"]

F = np.float32


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``w * (x * (1 / sqrt(mean(x²) + eps)))`` per row (mean in float64, rounded)."""
    var = ((x * x).astype(np.float64).sum(-1, keepdims=True) / x.shape[-1]).astype(F)
    r = (F(1) / np.sqrt(var + F(eps))).astype(F)
    return (w * (x * r)).astype(F)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x * cat(c, c) + rotate_half(x) * cat(s, s)`` over the last axis."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * cos + (-b) * sin, b * cos + a * sin], axis=-1).astype(F)


def silu(x: np.ndarray) -> np.ndarray:
    return (x / (F(1) + np.exp(-x))).astype(F)


def fake_quant(q: _AQ, x: np.ndarray) -> np.ndarray:
    """One tensor through an attention quantizer (``tbt.quant.activation`` forward values)."""
    if q.kind == 0:
        return x
    x = x.astype(F)
    if q.kind == 1:  # min/max
        c = F(q.clip)
        xc = np.clip(x, -c, c)
        if q.is_signed:
            ma = F(np.abs(xc).max())
            s = F(F(2 ** (q.bits - 1) - 1) * (F(1) / ma)) if ma > 0 else F(1)
            return (np.rint(xc * s) / s).astype(F)
        lo = F(xc.min())
        rng = F(F(xc.max() - lo) + F(1e-8))
        lv = F(2 ** q.bits - 1)
        return (np.rint((xc - lo) / rng * lv) / lv * rng + lo).astype(F)
    a = F(q.alpha_c)
    off = F(x.astype(np.float64).mean()) if q.center else F(x.min()) if q.shift_min else F(0)
    xs = (x - off).astype(F)
    if q.use_sign:
        code = np.sign(xs)
    else:
        code = np.clip(np.rint(xs / a), q.qn, q.qp)
    y = (code * a).astype(F)
    return (y + off).astype(F) if q.shift_min else y


class EngineReference:
    """The engine's model in numpy (see the module docstring)."""

    def __init__(self, engine: Engine, backend: str | None = "ref",
                 trace: Callable[[str, int, np.ndarray], None] | None = None) -> None:
        self.e, self.trace = engine, trace
        self._lins = [{n: self._rebuild(lin, backend) for n, lin in row.items()
                       if lin is not None} for row in engine._lins]
        self._head = None if engine._head is None else self._rebuild(engine._head, backend)
        self.reset()

    @staticmethod
    def _rebuild(lin: _Linear, backend: str | None) -> PackedLinearNP:
        rt = lin.rt
        return PackedLinearNP(rt._packed, rt.in_features, rt.weight.scale, rt.bias, rt.packing,
                              rt.act, backend)

    def reset(self) -> None:
        self.k: list[np.ndarray | None] = [None] * self.e.n_layers
        self.v: list[np.ndarray | None] = [None] * self.e.n_layers
        self.position = 0

    def _lin(self, lin: PackedLinearNP, x: np.ndarray) -> np.ndarray:
        shift = F(x.astype(np.float64).mean()) if lin.act.needs_mean else None
        return lin(x, None if shift is None else float(shift))

    def _split(self, row: dict, name: str, x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        names = {"q": ["q", "k", "v"], "gate": ["gate", "up"]}[name]
        if names[1] not in row:  # fused
            y = self._lin(row[name], x)
            return np.split(y, np.cumsum(sizes)[:-1], axis=-1)
        return [self._lin(row[n], x) for n in names]

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens ``(B, T)`` after the cached ones → last-position logits ``(B, vocab)``."""
        e = self.e
        tok = np.asarray(tokens, dtype=np.int64)
        b, t = tok.shape
        pos0 = self.position
        x = np.stack([self._embed(row) for row in tok])  # (B, T, d)
        h, hk, d = e.n_heads, e.n_kv, e.head_dim
        cos_all, sin_all = self._tables(pos0 + t)
        cos, sin = cos_all[pos0:pos0 + t], sin_all[pos0:pos0 + t]
        mask = np.triu(np.ones((t, pos0 + t), dtype=bool), k=pos0 + 1)  # True = masked
        for i, row in enumerate(self._lins):
            ln1, ln2 = e._norms[i]
            aq = e._aqs[i]
            hid = rmsnorm(x, ln1, e._eps)
            q, k, v = self._split(row, "q", hid, [h * d, hk * d, hk * d])
            q = q.reshape(b, t, h, d).transpose(0, 2, 1, 3)
            k = k.reshape(b, t, hk, d).transpose(0, 2, 1, 3)
            v = v.reshape(b, t, hk, d).transpose(0, 2, 1, 3)
            q = (rope(q, cos, sin) * F(e.attn_scale)).astype(F)
            k = rope(k, cos, sin)
            self.k[i] = k if self.k[i] is None else np.concatenate([self.k[i], k], axis=2)
            self.v[i] = v if self.v[i] is None else np.concatenate([self.v[i], v], axis=2)
            for site, arr in (("query", q), ("key", self.k[i]), ("value", self.v[i])):
                if self.trace:
                    self.trace(site, i, arr)
            qq = fake_quant(aq[0], q)
            kq = np.repeat(fake_quant(aq[1], self.k[i]), h // hk, axis=1)
            vq = np.repeat(fake_quant(aq[2], self.v[i]), h // hk, axis=1)
            s = np.einsum("bhtd,bhjd->bhtj", qq.astype(np.float64), kq.astype(np.float64))
            s = np.where(mask, -np.inf, s.astype(F))
            p = np.exp((s - s.max(-1, keepdims=True)).astype(F)).astype(F)
            p = (p * (F(1) / p.astype(np.float64).sum(-1, keepdims=True).astype(F))).astype(F)
            if self.trace:
                self.trace("probs", i, p)
            p = fake_quant(aq[3], p)
            o = np.einsum("bhtj,bhjd->bhtd", p.astype(np.float64), vq.astype(np.float64))
            o = o.astype(F).transpose(0, 2, 1, 3).reshape(b, t, h * d)
            if self.trace:
                self.trace("o_proj", i, o)
            x = (x + self._lin(row["o"], o)).astype(F)
            hid = rmsnorm(x, ln2, e._eps)
            g, u = self._split(row, "gate", hid, [e.inter, e.inter])
            a = (silu(g) * u).astype(F)
            if self.trace:
                self.trace("down_proj", i, a)
            x = (x + self._lin(row["down"], a)).astype(F)
        last = rmsnorm(x[:, -1], e._norm, e._eps)
        self.position = pos0 + t
        if self._head is not None:
            return self._lin(self._head, last)
        y = (last.astype(np.float64) @ e._head_w.astype(np.float64).T).astype(F)
        return y if e._head_b is None else (y + e._head_b).astype(F)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        e = self.e
        if e._emb_kind == 0:
            return e._emb_f[ids].astype(F)
        from tbt.export.format import Packing
        from tbt.export.pack import unpack

        packing = Packing.TERNARY_2BIT if e._emb_kind == 1 else Packing.BINARY_1BIT
        codes = unpack(e._emb_p[ids], packing, e.d)
        return (codes.astype(F) * e._emb_scale[ids][:, None]).astype(F)

    def _tables(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        from tbt.runtime.engine import _rope_tables

        return _rope_tables(self.e.config, self.e.head_dim, n)
