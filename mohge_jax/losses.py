"""Losses (spec §3): masked LM cross-entropy, Group-Wise and Intra-Group auxiliary losses,
the Switch loss of the homogeneous baseline, and the router z-loss. All in float32.

Token counts (c_g, c_e) are integer counts and carry no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def counts(ids_TxK: jax.Array, num: int) -> jax.Array:
  """How many tokens chose each of `num` ids: [num] float32 (no gradient). A one-hot sum,
  not a scatter-add (atomics on few bins serialise on GPUs)."""
  return jnp.sum(ids_TxK.reshape(-1, 1) == jnp.arange(num, dtype=ids_TxK.dtype), axis=0,
                 dtype=jnp.float32)


def size_weights(widths: Sequence[int], delta: float) -> jax.Array:
  """w_g = (W_g - W_min + Delta) / Delta."""
  widths_G = jnp.asarray(widths, jnp.float32)
  return (widths_G - jnp.min(widths_G) + delta) / delta


def per_chunk(loss_fn, chunk: int, *arrays_TxX: jax.Array) -> jax.Array:
  """`loss_fn(*arrays)` with the statistics of consecutive chunks of `chunk` tokens of the
  leading T axis (each chunk its own loss), averaged over the chunks. chunk = 0: one chunk
  of all T tokens. T must be a multiple of chunk."""
  T = arrays_TxX[0].shape[0]
  if not chunk or chunk == T:
    return loss_fn(*arrays_TxX)
  if T % chunk:
    raise ValueError(f"{T} tokens do not split into chunks of {chunk} (loss.aux_tokens)")
  split = lambda a: a.reshape(T // chunk, chunk, *a.shape[1:])
  return jnp.mean(jax.vmap(loss_fn)(*map(split, arrays_TxX)))


def group_wise_aux_loss(group_softmax_TxG: jax.Array, group_ids_TxKg: jax.Array, *,
                        widths: Sequence[int], delta: float, coef: float,
                        chunk: int = 0) -> jax.Array:
  """L_GW = coef * G * sum_g w_g * mean_t(S_tg) * c_g / (T*Kg), over chunks of `chunk`
  tokens (see `per_chunk`; 0: all T tokens)."""
  def loss(s_TxG, ids_TxKg):
    T, G = s_TxG.shape
    Kg = ids_TxKg.shape[-1]
    c_G = counts(ids_TxKg, G)
    s_mean_G = jnp.mean(s_TxG.astype(jnp.float32), axis=0)
    return coef * G * jnp.sum(size_weights(widths, delta) * s_mean_G * c_G / (T * Kg))
  return per_chunk(loss, chunk, group_softmax_TxG, group_ids_TxKg)


def intra_group_aux_loss(expert_probs_TxE: jax.Array, expert_ids_TxK: jax.Array, *,
                         experts_per_group: int, top_k_groups: int, coef: float,
                         chunk: int = 0) -> jax.Array:
  """L_IG = coef * (N*Kg) * sum_e mean_t(P_te) * c_e / (T*K): one sum over all E experts,
  over chunks of `chunk` tokens (see `per_chunk`; 0: all T tokens)."""
  def loss(p_TxE, ids_TxK):
    T, E = p_TxE.shape
    K = ids_TxK.shape[-1]
    c_E = counts(ids_TxK, E)
    p_mean_E = jnp.mean(p_TxE.astype(jnp.float32), axis=0)
    return coef * (experts_per_group * top_k_groups) * jnp.sum(p_mean_E * c_E / (T * K))
  return per_chunk(loss, chunk, expert_probs_TxE, expert_ids_TxK)


def switch_aux_loss(router_probs_TxE: jax.Array, expert_ids_TxK: jax.Array, *,
                    coef: float, chunk: int = 0) -> jax.Array:
  """Switch load balancing: coef * E * sum_e f_e * mean_t(P_te), f_e = c_e / (T*K), over
  chunks of `chunk` tokens (see `per_chunk`; 0: all T tokens)."""
  def loss(p_TxE, ids_TxK):
    T, E = p_TxE.shape
    K = ids_TxK.shape[-1]
    f_E = counts(ids_TxK, E) / (T * K)
    return coef * E * jnp.sum(f_E * jnp.mean(p_TxE.astype(jnp.float32), axis=0))
  return per_chunk(loss, chunk, router_probs_TxE, expert_ids_TxK)


def z_loss(logits_TxX: jax.Array, *, coef: float) -> jax.Array:
  """Router z-loss: coef * mean_t logsumexp(logits_t)^2."""
  lse_T = jax.nn.logsumexp(logits_TxX.astype(jnp.float32), axis=-1)
  return coef * jnp.mean(jnp.square(lse_T))


@jax.custom_vjp
def logits_matmul(x_BxLxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
  """x @ w with float32 output (logits for a float32 softmax) whose backward pass runs in
  x's dtype: the float32 logit gradient is rounded to bf16 before its two matmuls, which
  accumulate in float32. Differentiating a plain dot with a float32 output would multiply
  float32 by bf16 there, which XLA runs as a float32 (TF32) matmul at a fraction of the
  bf16 rate: on the 130k-word output layer that was ~10% of a MoHGE-3B step."""
  return jnp.dot(x_BxLxD, w_DxV, preferred_element_type=jnp.float32)


def _logits_fwd(x_BxLxD, w_DxV):
  return logits_matmul(x_BxLxD, w_DxV), (x_BxLxD, w_DxV)


def _logits_bwd(res, g_BxLxV):
  x_BxLxD, w_DxV = res
  g_BxLxV = g_BxLxV.astype(x_BxLxD.dtype)
  dx = jnp.einsum("blv,dv->bld", g_BxLxV, w_DxV, preferred_element_type=jnp.float32)
  dw = jnp.einsum("bld,blv->dv", x_BxLxD, g_BxLxV, preferred_element_type=jnp.float32)
  return dx.astype(x_BxLxD.dtype), dw.astype(w_DxV.dtype)


logits_matmul.defvjp(_logits_fwd, _logits_bwd)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array | None = None, *,
                  normalizer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean token negative log-likelihood over mask; returns (loss, number of tokens).

  normalizer: divide the summed NLL by this instead of the mask's token count (gradient
  accumulation: every micro-batch divides by the global batch's token count)."""
  logits = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = lse_BxL - target_logit_BxL
  if mask_BxL is None:
    mask_BxL = jnp.ones_like(nll_BxL)
  mask_BxL = mask_BxL.astype(jnp.float32)
  n = jnp.sum(mask_BxL)
  denominator = n if normalizer is None else normalizer
  return jnp.sum(nll_BxL * mask_BxL) / jnp.maximum(denominator, 1.0), n


def chunked_cross_entropy(x_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array,
                          mask_BxL: jax.Array, *, chunk: int,
                          normalizer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy(x @ w, ...)` without materialising the [B, L, V] float32 logits: the
  sequence is cut into chunks of `chunk` positions and scanned. Under differentiation the
  forward pass also computes the gradients (`_nll_sum`), so each chunk's logits are made
  once, not again in the backward pass. Same value and gradients (the logit gradient in
  x's dtype, as `logits_matmul`); peak memory of the output layer falls from B*L*V to
  B*chunk*V floats. `normalizer` as cross_entropy."""
  B, L, D = x_BxLxD.shape
  n = -(-L // chunk)
  pad = n * chunk - L
  if pad:
    x_BxLxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
    mask_BxL = jnp.pad(mask_BxL, ((0, 0), (0, pad)))
  mask_BxL = mask_BxL.astype(jnp.float32)
  to_chunks = lambda a: jnp.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)
  total = _nll_sum(to_chunks(x_BxLxD), w_DxV, to_chunks(targets_BxL), to_chunks(mask_BxL))
  n_tok = jnp.sum(mask_BxL)
  denominator = n_tok if normalizer is None else normalizer
  return total / jnp.maximum(denominator, 1.0), n_tok


def _chunk_logits(x_BxCxD, w_DxV, t_BxC):
  logits_BxCxV = jnp.dot(x_BxCxD, w_DxV, preferred_element_type=jnp.float32)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  tgt_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
  return logits_BxCxV, lse_BxC, tgt_BxC


@jax.custom_vjp
def _nll_sum(x_NxBxCxD, w_DxV, t_NxBxC, m_NxBxC):
  """Sum over chunks of the masked NLL of softmax(x @ w) (chunks on the leading axis)."""
  def body(total, xs):
    x_BxCxD, t_BxC, m_BxC = xs
    _, lse_BxC, tgt_BxC = _chunk_logits(x_BxCxD, w_DxV, t_BxC)
    return total + jnp.sum((lse_BxC - tgt_BxC) * m_BxC), None
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x_NxBxCxD, t_NxBxC, m_NxBxC))
  return total


def _nll_sum_fwd(x_NxBxCxD, w_DxV, t_NxBxC, m_NxBxC):
  """The loss and its gradients in one pass: the output is a scalar, so the backward pass
  only scales them by its cotangent. Per chunk: dlogits = (softmax - onehot) * mask in x's
  dtype, dx = dlogits @ w^T, dw += x^T @ dlogits (float32 accumulation)."""
  V = w_DxV.shape[1]

  def body(carry, xs):
    total, dw_DxV = carry
    x_BxCxD, t_BxC, m_BxC = xs
    logits_BxCxV, lse_BxC, tgt_BxC = _chunk_logits(x_BxCxD, w_DxV, t_BxC)
    p_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    hit_BxCxV = jnp.arange(V, dtype=t_BxC.dtype) == t_BxC[..., None]
    dlogits_BxCxV = (jnp.where(hit_BxCxV, p_BxCxV - 1.0, p_BxCxV)
                     * m_BxC[..., None]).astype(x_BxCxD.dtype)
    dx_BxCxD = jnp.dot(dlogits_BxCxV, w_DxV.T, preferred_element_type=jnp.float32)
    dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dlogits_BxCxV,
                                 preferred_element_type=jnp.float32)
    total = total + jnp.sum((lse_BxC - tgt_BxC) * m_BxC)
    return (total, dw_DxV), dx_BxCxD.astype(x_BxCxD.dtype)

  (total, dw_DxV), dx_NxBxCxD = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), jnp.zeros(w_DxV.shape, jnp.float32)),
      (x_NxBxCxD, t_NxBxC, m_NxBxC))
  return total, (dx_NxBxCxD, dw_DxV, jnp.zeros((), w_DxV.dtype))  # the last: w's dtype


def _nll_sum_bwd(res, g):
  dx_NxBxCxD, dw_DxV, w_like = res
  return dx_NxBxCxD * g.astype(dx_NxBxCxD.dtype), (dw_DxV * g).astype(w_like.dtype), None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)
