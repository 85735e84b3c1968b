"""Attention: RoPE (plain or DeepSeek-V2 YaRN), Multi-head Latent Attention, multi-head/GQA.

Letters: B batch, L length, H heads, R rope dims, C latent (kv_lora_rank).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mohge_jax import sparse_attention as dsa
from mohge_jax.config import ModelConfig
from mohge_jax.rope import apply_rope, rope_inv_freq
from pallas_kernels import mla_decode_gpu, splitk_gpu


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(self.dtype)


# ----------------------------------------------------------------------------- core


def resolve_impl(impl: str, dtype, masked: bool) -> str:
  """'auto': cuDNN flash attention on NVIDIA GPUs for bf16/fp16 without a document mask,
  XLA's attention elsewhere. (jax's own default, implementation=None, is XLA's: it
  materialises the [B, H, L, L] scores, which at L = 4096 costs more than the rest of the
  layer.)"""
  if impl != "auto":
    return impl
  if (jax.default_backend() == "gpu" and not masked
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
    return "cudnn"
  return "xla"


def attend(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxV: jax.Array, *, scale: float,
           segment_ids_BxL: jax.Array | None, impl: str) -> jax.Array:
  """Causal attention through `jax.nn.dot_product_attention` (cuDNN flash on GPU: see
  `resolve_impl`).

  Value heads narrower than query/key heads (MLA: 128 vs 192) are zero-padded, as the
  fused kernels need one head size; the padding is sliced off the output.
  """
  dv, dk = v_BxSxGxV.shape[-1], q_BxLxHxK.shape[-1]
  if dv < dk:
    v_BxSxGxV = jnp.pad(v_BxSxGxV, [(0, 0)] * 3 + [(0, dk - dv)])
  mask = None
  if segment_ids_BxL is not None:
    mask = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
  chosen = resolve_impl(impl, q_BxLxHxK.dtype, mask is not None)
  call = lambda implementation: jax.nn.dot_product_attention(  # noqa: E731
      q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, mask=mask, scale=scale, is_causal=True,
      implementation=implementation)
  if impl == "auto" and chosen == "cudnn":
    try:
      out = call("cudnn")
    except (NotImplementedError, RuntimeError, ValueError) as e:  # shapes cuDNN cannot take
      warnings.warn(f"model.attention_impl=auto uses XLA attention: cuDNN refused ({e})",
                    stacklevel=2)
      out = call("xla")
  else:
    out = call(chosen)
  return out[..., :dv]


class MLA(nnx.Module):
  """DeepSeek-V2 Multi-head Latent Attention (training form: keys/values decompressed).

  With model.sparse_attention=dsa it owns a lightning indexer (`dsa.Indexer`) and returns
  the indexer's KL loss (mean over queries) in its aux dict. `dsa_stage`: "dense_warmup"
  keeps the dense attention above and scores the indexer against it over all keys;
  "sparse" attends in latent form to each query's top-k keys only (`dsa.sparse_mla`),
  the KL over the selected keys. The indexer's inputs are stop-gradient in both stages.
  """

  def __init__(self, m: ModelConfig, *, rngs: nnx.Rngs, dsa_stage: str = "sparse"):
    D, H, std = m.d_model, m.num_heads, m.init_std
    self.m, self.dtype = m, jnp.dtype(m.dtype)
    dq = m.qk_nope_head_dim + m.qk_rope_head_dim
    normal = lambda *shape: nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))
    if m.q_lora_rank:
      self.w_dq = normal(D, m.q_lora_rank)
      self.q_norm = RMSNorm(m.q_lora_rank, eps=m.norm_eps, dtype=self.dtype)
      self.w_uq = normal(m.q_lora_rank, H * dq)
    else:
      self.w_q = normal(D, H * dq)
    self.w_dkv = normal(D, m.kv_lora_rank + m.qk_rope_head_dim)  # [c_kv ; k_rope]
    self.kv_norm = RMSNorm(m.kv_lora_rank, eps=m.norm_eps, dtype=self.dtype)
    self.w_ukv = normal(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim))
    self.w_o = nnx.Param(m.output_init_std  # writes into the residual stream: scaled init
                         * jax.random.normal(rngs.params(), (H * m.v_head_dim, D), jnp.float32))
    inv_freq, mscale2 = rope_inv_freq(m, m.qk_rope_head_dim)
    self.inv_freq = tuple(inv_freq.tolist())  # static: modules keep arrays only in Variables
    self.scale = mscale2 / math.sqrt(dq)
    self.dsa_stage = dsa_stage
    if m.sparse_attention == "dsa":
      self.indexer = dsa.Indexer(m, rngs=rngs)

  def _mm(self, x: jax.Array, w: nnx.Param) -> jax.Array:
    # Compute dtype in and out (GPUs and TPUs accumulate in float32 inside the matmul).
    # A float32 output cast back down would make both backward matmuls float32 x bf16,
    # which XLA runs as slow float32 (TF32) GEMMs.
    return jnp.dot(x, w[...].astype(self.dtype))

  def query_latent(self, x_BxLxD) -> jax.Array | None:
    """The compressed, normed query c_q [B, L, q_lora_rank]; None without compression."""
    return self.q_norm(self._mm(x_BxLxD, self.w_dq)) if self.m.q_lora_rank else None

  def queries(self, x_BxLxD, positions_BxL, cq_BxLxQ=None) -> jax.Array:
    """Per-head queries [B, L, H, P+R]: [q_nope; RoPE(q_rope)] (from c_q when given)."""
    return jnp.concatenate(self._query_parts(x_BxLxD, positions_BxL, cq_BxLxQ), axis=-1)

  def _query_parts(self, x_BxLxD, positions_BxL, cq_BxLxQ=None) -> tuple[jax.Array, jax.Array]:
    """(q_nope [B, L, H, P], RoPE(q_rope) [B, L, H, R]): the queries apart, for decoding,
    which uses them apart."""
    m = self.m
    B, L, _ = x_BxLxD.shape
    H, P, R = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim
    if m.q_lora_rank:
      cq_BxLxQ = self.query_latent(x_BxLxD) if cq_BxLxQ is None else cq_BxLxQ
      q = self._mm(cq_BxLxQ, self.w_uq)
    else:
      q = self._mm(x_BxLxD, self.w_q)
    q_BxLxHxPR = q.reshape(B, L, H, P + R)
    return q_BxLxHxPR[..., :P], apply_rope(q_BxLxHxPR[..., P:], positions_BxL, self.inv_freq)

  def latent(self, x_BxLxD, positions_BxL) -> tuple[jax.Array, jax.Array]:
    """What the KV cache holds per position: the normed latent c_kv [B, L, C] and the
    rotated rope key shared by all heads [B, L, R]."""
    m = self.m
    ckv_kr_BxLxCR = self._mm(x_BxLxD, self.w_dkv)
    c_BxLxC = self.kv_norm(ckv_kr_BxLxCR[..., :m.kv_lora_rank])
    k_rope_BxLxR = apply_rope(ckv_kr_BxLxCR[..., None, m.kv_lora_rank:], positions_BxL,
                              self.inv_freq)[:, :, 0]
    return c_BxLxC, k_rope_BxLxR

  def _w_uk_uv(self) -> tuple[jax.Array, jax.Array]:
    """The up-projection split per head: W_UK [C, H, P] and W_UV [C, H, V]."""
    m = self.m
    w_CxHxPV = self.w_ukv[...].astype(self.dtype).reshape(
        m.kv_lora_rank, m.num_heads, m.qk_nope_head_dim + m.v_head_dim)
    return w_CxHxPV[..., :m.qk_nope_head_dim], w_CxHxPV[..., m.qk_nope_head_dim:]

  def decode_weights(self, absorb: str = "none") -> "MLADecodeWeights":
    """The projections `decode(prepared=)` reads, laid out for it once (see
    `MLADecodeWeights`), in the compute dtype. absorb ("none", "query", "output", "both"):
    W_UK multiplied into q_nope's projection (w_q_nope [N, H*C], w_uk None) and/or W_UV
    into w_o (w_o [H*C, D], w_uv None), in float32 from the stored weights, then cast."""
    if absorb not in ABSORB_FORMS:
      raise ValueError(f"MLA.decode_weights: absorb={absorb!r}: must be one of {ABSORB_FORMS}")
    m = self.m
    H, P, R, V, C = (m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim,
                     m.kv_lora_rank)
    cast = lambda w: w[...].astype(self.dtype)  # noqa: E731

    def nope_rope(w_NxHPR):  # columns per head [P; R] -> [every head's P | every head's R]
      w_NxHxPR = w_NxHPR.reshape(-1, H, P + R)
      return w_NxHxPR[..., :P].reshape(-1, H * P), w_NxHxPR[..., P:].reshape(-1, H * R)

    if m.q_lora_rank:  # x -> [c_q | c_kv | k_rope]; c_q -> q_nope, c_q -> q_rope
      w_q_nope, w_uq = nope_rope(cast(self.w_uq))
      w_in = cast(self.w_dq)
    else:  # x -> q_nope, x -> [q_rope | c_kv | k_rope]
      (w_q_nope, w_in), w_uq = nope_rope(cast(self.w_q)), None
    w_in = jnp.concatenate([w_in, cast(self.w_dkv)], axis=1)
    w_CxHxPV = cast(self.w_ukv).reshape(C, H, P + V)
    w_uk_HxPxC = jnp.transpose(w_CxHxPV[..., :P], (1, 2, 0))
    w_uv_HxCxV = jnp.transpose(w_CxHxPV[..., P:], (1, 0, 2))
    w_o = cast(self.w_o)
    f32 = lambda w: w[...].astype(jnp.float32)  # noqa: E731
    hi = jax.lax.Precision.HIGHEST
    w32_CxHxPV = f32(self.w_ukv).reshape(C, H, P + V)
    if absorb in ("query", "both"):  # q_lat = (x W_q_nope) W_UK = x (W_q_nope W_UK)
      w32_NxHxPR = f32(self.w_uq if m.q_lora_rank else self.w_q).reshape(-1, H, P + R)
      w_q_nope = jnp.einsum("nhp,chp->nhc", w32_NxHxPR[..., :P], w32_CxHxPV[..., :P],
                            precision=hi).reshape(-1, H * C).astype(self.dtype)
      w_uk_HxPxC = None
    if absorb in ("output", "both"):  # out = (o_lat W_UV) W_o = o_lat (W_UV W_o)
      w_o = jnp.einsum("chv,hvd->hcd", w32_CxHxPV[..., P:], f32(self.w_o).reshape(H, V, -1),
                       precision=hi).reshape(H * C, -1).astype(self.dtype)
      w_uv_HxCxV = None
    return MLADecodeWeights(w_in, w_uq, w_q_nope, w_uk_HxPxC, w_uv_HxCxV, w_o)

  def _decode_mm(self, x_BxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
    """A decode projection with prepared weights: model.decode_gemm's kernel where it
    applies (`splitk_gpu.pick_splits`), else jnp.dot."""
    if self.m.decode_gemm == "splitk" and splitk_kernels():
      splits = splitk_gpu.pick_splits(*x_BxK.shape, w_KxN.shape[1], x_BxK.dtype,
                                      max_splits=DECODE_SPLITK_MAX)
      if splits is not None and w_KxN.dtype == x_BxK.dtype:
        return splitk_gpu.splitk_matmul(x_BxK, w_KxN, splits=splits)
    return jnp.dot(x_BxK, w_KxN)

  def _decode_inputs(self, x_Bx1xD, pos_Bx1, prepared: "MLADecodeWeights | None"):
    """One token per row -> (c_q [B, 1, Q] or None, q_nope [B, H, P] (absorbed: q_lat
    [B, H, C]), RoPE(q_rope) [B, H, R], the token's cache entry MLACache [B, 1, ...]), from
    the module's weights or from `prepared`: q_nope's GEMM apart (the absorbed product
    reads its output whole: a column block of a fused GEMM's was copied out first, on the
    H200 a launch on the decode step's serial path), one GEMM for the rest of x's
    projections, its columns split."""
    if prepared is None:
      cq_Bx1xQ = self.query_latent(x_Bx1xD)
      q_nope_Bx1xHxP, q_rope_Bx1xHxR = self._query_parts(x_Bx1xD, pos_Bx1, cq_Bx1xQ)
      return (cq_Bx1xQ, q_nope_Bx1xHxP[:, 0], q_rope_Bx1xHxR[:, 0],
              MLACache(*self.latent(x_Bx1xD, pos_Bx1)))
    m = self.m
    B = x_Bx1xD.shape[0]
    H, R, C, Q = m.num_heads, m.qk_rope_head_dim, m.kv_lora_rank, m.q_lora_rank
    x_BxD = x_Bx1xD[:, 0]
    y_BxN = self._decode_mm(x_BxD, prepared.w_in)  # [q_rope (or c_q) | c_kv | k_rope]
    # Materialised whole before its columns are split (H200 profile, MoHGE-3B batch 256:
    # attention's GEMMs 0.311 ms a step with the barrier, 0.341 without; notes_generate.md).
    y_BxN = jax.lax.optimization_barrier(y_BxN)
    N = y_BxN.shape[1]
    cq_Bx1xQ = None
    if Q:
      cq_BxQ = self.q_norm(y_BxN[:, :Q])
      cq_Bx1xQ, q_rope_BxHR = cq_BxQ[:, None], jnp.dot(cq_BxQ, prepared.w_uq)
      q_nope_BxHP = jnp.dot(cq_BxQ, prepared.w_q_nope)
    else:
      # Absorbed, q_lat's GEMM kept apart from w_in's (XLA's dot merger would join GEMMs
      # of one operand, then copy q_lat's column block out of the joined output).
      x_q_BxD = (x_BxD if prepared.w_uk_HxPxC is not None
                 else jax.lax.optimization_barrier(x_BxD))
      q_rope_BxHR, q_nope_BxHP = y_BxN[:, :H * R], self._decode_mm(x_q_BxD, prepared.w_q_nope)
    rope = lambda a_BxJxR: apply_rope(a_BxJxR[:, None], pos_Bx1, self.inv_freq)[:, 0]  # noqa: E731
    q_rope_BxHxR = rope(q_rope_BxHR.reshape(B, H, R))
    k_rope_BxR = rope(y_BxN[:, None, N - R:])[:, 0]
    c_BxC = self.kv_norm(y_BxN[:, N - R - C:N - R])
    return (cq_Bx1xQ, q_nope_BxHP.reshape(B, H, -1), q_rope_BxHxR,
            MLACache(c_BxC[:, None], k_rope_BxR[:, None]))

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None, *, return_latent=False):
    """Causal self-attention over the L positions -> (output, aux). Dense: keys and values
    decompressed per head, aux empty; DSA (`_dsa`): aux holds the indexer's KL. With
    return_latent, (output, aux, MLACache of the L positions [B, L, ...]): what a KV cache
    stores (prefill)."""
    m = self.m
    B, L, _ = x_BxLxD.shape
    H, P, R, V = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    cq_BxLxQ = self.query_latent(x_BxLxD)
    q_BxLxHxPR = self.queries(x_BxLxD, positions_BxL, cq_BxLxQ)
    c_BxLxC, k_rope_BxLxR = self.latent(x_BxLxD, positions_BxL)
    if m.sparse_attention == "dsa":
      out_BxLxD, aux, k_I_BxLxI = self._dsa(x_BxLxD, cq_BxLxQ, positions_BxL, segment_ids_BxL,
                                            q_BxLxHxPR, c_BxLxC, k_rope_BxLxR)
      if return_latent:
        return out_BxLxD, aux, MLACache(c_BxLxC, k_rope_BxLxR, k_I_BxLxI)
      return out_BxLxD, aux
    kv_BxLxHxPV = self._mm(c_BxLxC, self.w_ukv).reshape(B, L, H, P + V)
    k_BxLxHxPR = jnp.concatenate(
        [kv_BxLxHxPV[..., :P], jnp.broadcast_to(k_rope_BxLxR[:, :, None], (B, L, H, R))],
        axis=-1)
    v_BxLxHxV = kv_BxLxHxPV[..., P:]
    o_BxLxHxV = attend(q_BxLxHxPR, k_BxLxHxPR, v_BxLxHxV, scale=self.scale,
                       segment_ids_BxL=segment_ids_BxL, impl=m.attention_impl)
    out_BxLxD = self._mm(o_BxLxHxV.reshape(B, L, H * V), self.w_o)
    return (out_BxLxD, {}, MLACache(c_BxLxC, k_rope_BxLxR)) if return_latent else (out_BxLxD, {})

  def _dsa(self, x_BxLxD, cq_BxLxQ, positions_BxL, segment_ids_BxL, q_BxLxHxPR, c_BxLxC,
           k_rope_BxLxR):
    """The DSA paths: queries absorbed into the latent space (q_lat = q_nope W_uk per head,
    so q_lat . c = q_nope . k_nope) and the output decompressed after (o = o_lat W_uv).
    Returns (output, aux, the indexer's keys [B, L, I]: what a cache keeps for decoding)."""
    m = self.m
    B, L, _ = x_BxLxD.shape
    H, P, V, C = m.num_heads, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank
    sg = jax.lax.stop_gradient
    q_I, w_I, k_I = self.indexer(sg(x_BxLxD), None if cq_BxLxQ is None else sg(cq_BxLxQ),
                                 positions_BxL)
    w_ukv_CxHxPV = self.w_ukv[...].astype(self.dtype).reshape(C, H, P + V)
    q_lat_BxLxHxC = jnp.einsum("blhp,chp->blhc", q_BxLxHxPR[..., :P], w_ukv_CxHxPV[..., :P])
    q_rope_BxLxHxR = q_BxLxHxPR[..., P:]
    chunk = m.dsa_query_chunk
    if self.dsa_stage == "dense_warmup":
      kl_BxL = dsa.dense_indexer_kl(q_lat_BxLxHxC, q_rope_BxLxHxR, c_BxLxC, k_rope_BxLxR, q_I,
                                    w_I, k_I, scale=self.scale, chunk=chunk,
                                    segment_ids_BxT=segment_ids_BxL)
      # The dense attention itself, unchanged (the decompressed form above).
      kv_BxLxHxPV = self._mm(c_BxLxC, self.w_ukv).reshape(B, L, H, P + V)
      k_BxLxHxPR = jnp.concatenate(
          [kv_BxLxHxPV[..., :P],
           jnp.broadcast_to(k_rope_BxLxR[:, :, None], (B, L, H, m.qk_rope_head_dim))], axis=-1)
      o_BxLxHxV = attend(q_BxLxHxPR, k_BxLxHxPR, kv_BxLxHxPV[..., P:], scale=self.scale,
                         segment_ids_BxL=segment_ids_BxL, impl=m.attention_impl)
    else:
      o_lat_BxLxHxC, kl_BxL = dsa.sparse_stage(
          q_lat_BxLxHxC, q_rope_BxLxHxR, c_BxLxC, k_rope_BxLxR, q_I, w_I, k_I,
          segment_ids_BxL, topk=m.dsa_topk, chunk=chunk, method=m.dsa_topk_method,
          impl=m.dsa_impl, scale=self.scale)
      o_BxLxHxV = jnp.einsum("blhc,chv->blhv", o_lat_BxLxHxC, w_ukv_CxHxPV[..., P:])
    out = self._mm(o_BxLxHxV.reshape(B, L, H * V), self.w_o)
    return out, {"dsa_kl": jnp.mean(kl_BxL)}, k_I

  def decode(self, x_Bx1xD, positions_B, cache: "MLACache", layer: jax.Array | None = None,
             prepared: "MLADecodeWeights | None" = None) -> tuple[jax.Array, "MLACache"]:
    """One new token per row at per-row positions, in the absorbed form: W_UK folded into
    the query and W_UV applied after attention, so attention runs in the latent space
    against the cache (never per-head keys or values). Writes the token's latent and rope
    key at slot `positions_B[b]` of row b and attends to slots 0..positions_B[b].

    `cache`: this layer's [B, S, ...], or with `layer` (an index) a stack's [n, B, S, ...],
    written at [layer, b, positions_B[b]] only: a layer scan that carries the stacked cache
    updates it in place, where passing each layer's slice in and out as the scan's input and
    output would copy the whole cache every step.

    DSA (sparse stage): the indexer's key of the token is cached too, and the token attends
    to the top-k cached positions by index score (`_dsa_select`), as in the forward pass.

    `prepared` (`decode_weights()`): the projections read from there, in the decode layout,
    instead of the module's weights (which may then be placeholders; the norms and DSA's
    indexer still come from the module): the same function, fewer ops around the GEMMs."""
    m = self.m
    B = x_Bx1xD.shape[0]
    H, V = m.num_heads, m.v_head_dim
    pos_Bx1 = positions_B[:, None]
    cq_Bx1xQ, q_nope_BxHxP, q_rope_BxHxR, new_Bx1 = self._decode_inputs(x_Bx1xD, pos_Bx1,
                                                                       prepared)
    if m.sparse_attention == "dsa":
      q_I, w_I, k_I = self.indexer(x_Bx1xD, cq_Bx1xQ, pos_Bx1)
      new_Bx1 = new_Bx1._replace(index_key=k_I)
    rows_B = jnp.arange(B)
    at = (rows_B, positions_B) if layer is None else (layer, rows_B, positions_B)
    cache = jax.tree.map(lambda c, n: c.at[at].set(n[:, 0]), cache, new_Bx1)
    mine = cache if layer is None else jax.tree.map(lambda c: c[layer], cache)  # [B, S, ...]
    if prepared is None:
      w_uk_CxHxP, w_uv_CxHxV = self._w_uk_uv()
      q_lat_BxHxC = jnp.einsum("bhp,chp->bhc", q_nope_BxHxP, w_uk_CxHxP)
    elif prepared.w_uk_HxPxC is None:  # absorbed: the query's GEMM gave q_lat
      q_lat_BxHxC = q_nope_BxHxP
    else:
      q_lat_BxHxC = jnp.einsum("bhp,hpc->bhc", q_nope_BxHxP, prepared.w_uk_HxPxC)
    S = mine.latent.shape[1]
    visible_BxS = jnp.arange(S)[None, :] <= positions_B[:, None]
    if m.sparse_attention == "dsa" and self.dsa_stage != "dense_warmup":
      idx_Bx1xK, valid_Bx1xK = self._dsa_select(q_I, w_I, mine.index_key, visible_BxS)
      o_lat_Bx1xHxC, _ = dsa.sparse_mla(
          q_lat_BxHxC[:, None], q_rope_BxHxR[:, None], mine.latent, mine.k_rope, idx_Bx1xK,
          valid_Bx1xK, scale=self.scale, chunk=1, impl=m.dsa_impl)
      o_lat_BxHxC = o_lat_Bx1xHxC[:, 0]
    elif m.decode_attention == "pallas" or (m.decode_attention == "auto" and (
        mla_decode_gpu.use_for_auto(B, m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, S,
                                    mine.latent.dtype))):  # one read of the cache
      if S % mla_decode_gpu.SLOTS:
        raise ValueError(f"model.decode_attention=pallas needs a cache length that is a "
                         f"multiple of {mla_decode_gpu.SLOTS} (prompt + new tokens), got {S}")
      o_lat_BxHxC = mla_decode_gpu.mla_decode(
          q_lat_BxHxC.astype(mine.latent.dtype), q_rope_BxHxR.astype(mine.latent.dtype),
          mine.latent, mine.k_rope, positions_B + 1, scale=float(self.scale), pdl=m.decode_pdl)
    else:
      scores_BxHxS = (
          jnp.einsum("bhc,bsc->bhs", q_lat_BxHxC, mine.latent, preferred_element_type=jnp.float32)
          + jnp.einsum("bhr,bsr->bhs", q_rope_BxHxR, mine.k_rope,
                       preferred_element_type=jnp.float32)) * self.scale
      scores_BxHxS = jnp.where(visible_BxS[:, None, :], scores_BxHxS, jnp.finfo(jnp.float32).min)
      probs_BxHxS = jax.nn.softmax(scores_BxHxS, axis=-1).astype(self.dtype)
      o_lat_BxHxC = jnp.einsum("bhs,bsc->bhc", probs_BxHxS, mine.latent)
    if prepared is None:
      o_BxHxV = jnp.einsum("bhc,chv->bhv", o_lat_BxHxC, w_uv_CxHxV)
      return self._mm(o_BxHxV.reshape(B, 1, H * V), self.w_o), cache
    if prepared.w_uv_HxCxV is None:  # absorbed: w_o takes the latent output
      o_BxN = o_lat_BxHxC.reshape(B, -1).astype(self.dtype)
    else:
      o_BxN = jnp.einsum("bhc,hcv->bhv", o_lat_BxHxC, prepared.w_uv_HxCxV).reshape(B, H * V)
    return self._decode_mm(o_BxN, prepared.w_o)[:, None], cache

  def _dsa_select(self, q_Bx1xJxI, w_Bx1xJ, index_key_BxSxI, visible_BxS):
    """The decoded token's top-k cached positions by index score among the visible ones:
    idx [B, 1, K] and valid [B, 1, K], K = min(dsa_topk, S) (fewer visible than K: all of
    them, the other slots invalid), as `sparse_attention.select_topk` in the forward pass."""
    scores_Bx1xS = dsa.index_scores(q_Bx1xJxI, w_Bx1xJ, index_key_BxSxI)
    K = min(self.m.dsa_topk, scores_Bx1xS.shape[-1])
    _, idx_Bx1xK = jax.lax.top_k(jnp.where(visible_BxS[:, None], scores_Bx1xS, -jnp.inf), K)
    valid_Bx1xK = jnp.take_along_axis(visible_BxS[:, None], idx_Bx1xK, axis=-1)
    return idx_Bx1xK.astype(jnp.int32), valid_Bx1xK


class MLADecodeWeights(NamedTuple):
  """MLA's projections laid out for decoding (`MLA.decode_weights`, `MLA.decode(prepared=)`),
  in the compute dtype, once before the decode loop: the same numbers as the module's
  weights (nothing absorbed into larger products), arranged so that a step runs its GEMMs
  with no slice, concatenation or transpose of a weight between them.

  w_in: x's projections but q_nope's fused into one GEMM (all read x): w_q's q_rope
    columns (q_lora_rank 0: [D, H*R], every head's) or w_dq ([D, Q]), then w_dkv
    ([D, C + R]): column blocks that need no gather.
  w_uq: q_lora_rank > 0: w_uq's q_rope columns [Q, H*R] (every head's); else None.
  w_q_nope: the q_nope columns [D or Q, H*P] (every head's) of w_q or w_uq: a GEMM of its
    own, whose output the absorbed product reads whole.
  w_uk_HxPxC, w_uv_HxCxV: w_ukv's key and value halves per head, heads leading (the batch
    axis of the absorbed products "bhp,hpc->bhc" and "bhc,hcv->bhv").
  w_o: [H*V, D].
  absorb="query" (`MLA.decode_weights`): w_q_nope is W_q_nope W_UK, [D or Q, H*C] (the
    query's latent directly) and w_uk_HxPxC None; absorb="output": w_o is W_UV W_o,
    [H*C, D], and w_uv_HxCxV None; "both": both."""
  w_in: jax.Array
  w_uq: jax.Array | None
  w_q_nope: jax.Array
  w_uk_HxPxC: jax.Array | None
  w_uv_HxCxV: jax.Array | None
  w_o: jax.Array


ABSORB_FORMS = ("none", "query", "output", "both")   # MLA.decode_weights(absorb=)
# model.decode_gemm=splitk: the most splits of K a projection takes (`pick_splits`); at 8
# (the most it can) MoHGE-3B's step was slower than with XLA's GEMMs (twenty-fifth session).
DECODE_SPLITK_MAX = 8


def splitk_kernels() -> bool:
  """Whether this process's default device runs the Mosaic GPU kernels (a Hopper GPU)."""
  import pallas_kernels  # noqa: PLC0415 - asked for on the decode path only
  return pallas_kernels.resolve_backend("auto") == "mosaic_gpu"
# The MLA parameters `MLADecodeWeights` holds (what `MLA.decode(prepared=)` does not read).
DECODE_WEIGHT_NAMES = ("w_q", "w_dq", "w_uq", "w_dkv", "w_ukv", "w_o")


class MLACache(NamedTuple):
  """MLA's KV cache: per position only the normed latent c_kv and the rotated rope key
  (kv_lora_rank + qk_rope_head_dim numbers, against 2 * H * head_dim for per-head keys and
  values), and with DSA the lightning indexer's key (dsa_index_dim more). Slot s holds
  position s of its row. Stacked layers add a leading [layers] axis."""
  latent: jax.Array  # [B, S, C]
  k_rope: jax.Array  # [B, S, R]
  index_key: jax.Array | None = None  # [B, S, I] (DSA only)

  @staticmethod
  def zeros(m: ModelConfig, batch: int, length: int, layers: int | None = None,
            dtype=None) -> "MLACache":
    dtype = jnp.dtype(dtype or m.dtype)
    shape = (() if layers is None else (layers,)) + (batch, length)
    return MLACache(jnp.zeros(shape + (m.kv_lora_rank,), dtype),
                    jnp.zeros(shape + (m.qk_rope_head_dim,), dtype),
                    jnp.zeros(shape + (m.dsa_index_dim,), dtype)
                    if m.sparse_attention == "dsa" else None)


class MHA(nnx.Module):
  """Multi-head attention with grouped-query heads (num_kv_heads) and RoPE."""

  def __init__(self, m: ModelConfig, *, rngs: nnx.Rngs):
    D, H, G, K, std = m.d_model, m.num_heads, m.kv_heads, m.head_dim, m.init_std
    self.m, self.dtype = m, jnp.dtype(m.dtype)
    normal = lambda *shape: nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))
    self.w_q = normal(D, H * K)
    self.w_kv = normal(D, 2 * G * K)
    self.w_o = nnx.Param(m.output_init_std  # writes into the residual stream: scaled init
                         * jax.random.normal(rngs.params(), (H * K, D), jnp.float32))
    inv_freq, mscale2 = rope_inv_freq(m, K)
    self.inv_freq = tuple(inv_freq.tolist())
    self.scale = mscale2 / math.sqrt(K)

  _mm = MLA._mm

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None):
    m = self.m
    B, L, _ = x_BxLxD.shape
    H, G, K = m.num_heads, m.kv_heads, m.head_dim
    q_BxLxHxK = apply_rope(self._mm(x_BxLxD, self.w_q).reshape(B, L, H, K), positions_BxL,
                           self.inv_freq)
    kv_BxLx2GxK = self._mm(x_BxLxD, self.w_kv).reshape(B, L, 2 * G, K)
    k_BxLxGxK = apply_rope(kv_BxLx2GxK[:, :, :G], positions_BxL, self.inv_freq)
    o_BxLxHxK = attend(q_BxLxHxK, k_BxLxGxK, kv_BxLx2GxK[:, :, G:], scale=self.scale,
                       segment_ids_BxL=segment_ids_BxL, impl=m.attention_impl)
    return self._mm(o_BxLxHxK.reshape(B, L, H * K), self.w_o), {}
