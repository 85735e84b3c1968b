"""DeepSeek Sparse Attention (spec §2): the lightning indexer, causal top-k selection, MLA
over the selected positions in its latent (MQA) form, and the indexer's KL losses.

    q_I, w, k_I = indexer(x, c_q, positions)          # [B,T,J,I], [B,T,J], [B,T,I]
    idx, valid, score = select_topk(q_I, w, k_I, ...)  # [B,T,K] each: K keys per query
    o_lat, p = sparse_mla(q_lat, q_rope, c, k_rope, idx, valid, ...)  # [B,T,H,C], [B,T,K]
    o_lat, kl = sparse_stage(q_lat, q_rope, c, k_rope, q_I, w, k_I, ...)  # the three, and
                                                # the KL per query [B,T]: a layer's sparse stage

Every function that pairs queries with keys runs over chunks of Q queries (`lax.map`): the
indexer scores [B,Q,S] and the gathered latents [B,Q,K,C+R] exist for one chunk at a time,
never for the whole sequence. Forward and backward are autodiff of these pure-JAX
functions; `dense_mask_mla` (an additive mask over all keys, which saves nothing) is the
correctness reference for tests.

Letters: B batch, T queries, S keys (= T), H heads, C latent (kv_lora_rank), R rope dims,
J indexer heads, I indexer dim, K selected keys per query, Q queries per chunk.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from mohge_jax.config import DSA_IMPLS, DSA_TOPK_METHODS, ModelConfig
from mohge_jax.sharding import BATCH_AXES
from mohge_jax.rope import apply_rope, rope_inv_freq

# A finite "minus infinity": a row with every key masked stays finite (uniform) instead of
# NaN, which matters for padded query rows whose cotangent is zero (0 * NaN = NaN).
_MASKED = -1e30


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...] + self.bias[...]).astype(x.dtype)


class Indexer(nnx.Module):
  """The lightning indexer: J heads of dim I, one key per position shared by all heads.

  q_I = c_q W_q (x W_q without query compression), k_I = LayerNorm(x W_k), RoPE on the
  first `dsa_index_rope_dim` dims of both, head weights w = x W_w / sqrt(J I).
  """

  def __init__(self, m: ModelConfig, *, rngs: nnx.Rngs):
    D, J, I, std = m.d_model, m.dsa_index_heads, m.dsa_index_dim, m.init_std
    normal = lambda *shape: nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))
    self.m, self.dtype = m, jnp.dtype(m.dtype)
    self.w_q = normal(m.q_lora_rank or D, J * I)
    self.w_k = normal(D, I)
    self.k_norm = LayerNorm(I, eps=m.norm_eps)
    self.w_head = normal(D, J)
    inv_freq, _ = rope_inv_freq(m, max(m.dsa_index_rope_dim, 2))
    self.inv_freq = tuple(inv_freq.tolist())

  def __call__(self, x_BxTxD, cq_BxTxQ, positions_BxT):
    m = self.m
    B, T, _ = x_BxTxD.shape
    J, I, R = m.dsa_index_heads, m.dsa_index_dim, m.dsa_index_rope_dim
    mm = lambda a, w: jnp.dot(a, w[...].astype(self.dtype))  # noqa: E731
    src = x_BxTxD if cq_BxTxQ is None else cq_BxTxQ
    q_BxTxJxI = mm(src, self.w_q).reshape(B, T, J, I)
    k_BxTx1xI = self.k_norm(mm(x_BxTxD, self.w_k))[:, :, None, :]
    if R:
      q_BxTxJxI = jnp.concatenate(
          [apply_rope(q_BxTxJxI[..., :R], positions_BxT, self.inv_freq), q_BxTxJxI[..., R:]], -1)
      k_BxTx1xI = jnp.concatenate(
          [apply_rope(k_BxTx1xI[..., :R], positions_BxT, self.inv_freq), k_BxTx1xI[..., R:]], -1)
    w_BxTxJ = mm(x_BxTxD, self.w_head).astype(jnp.float32) / math.sqrt(J * I)
    return q_BxTxJxI, w_BxTxJ, k_BxTx1xI[:, :, 0]


# ----------------------------------------------------------------------------- chunking


def over_query_chunks(fn, chunk: int, T: int, *per_query):
  """fn(t0, *arrays [B, Q, ...]) -> pytree of [B, Q, ...], run over chunks of Q = chunk
  queries with `lax.map` (t0: the chunk's first query index); T is padded to a multiple of
  Q (padding rows repeat query 0's inputs) and the padding sliced off the outputs.

  Each chunk is rematerialised in the backward pass (`jax.checkpoint`): autodiff of a
  scan otherwise keeps every chunk's intermediates (the gathered latents, the scores),
  stacked, i.e. the whole [B, T, K, C+R] gather this chunking exists to avoid."""
  Q = min(chunk, T)
  n = -(-T // Q)
  pad = n * Q - T

  def split(a):
    if pad:
      a = jnp.concatenate([a, jnp.broadcast_to(a[:, :1], (a.shape[0], pad) + a.shape[2:])], 1)
    return jnp.moveaxis(a.reshape(a.shape[0], n, Q, *a.shape[2:]), 1, 0)

  def merge(a):
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], n * Q, *a.shape[3:])[:, :T]

  t0_N = jnp.arange(n, dtype=jnp.int32) * Q
  if n == 1:
    out = fn(t0_N[0], *per_query)
    return jax.tree.map(lambda a: a[:, :T], out) if pad else out
  body = jax.checkpoint(lambda args: fn(args[0], *args[1:]))
  out = jax.lax.map(body, (t0_N, *map(split, per_query)))
  return jax.tree.map(merge, out)


def _allowed(t0, Q: int, key_idx, seg_q_BxQ, seg_k_BxS):
  """Which (query, key) pairs may attend: key index <= query index (same document when
  segment ids are given). key_idx: [S] or [B, Q, K]; returns [B, Q, S] or [B, Q, K]."""
  t_Q = t0 + jnp.arange(Q, dtype=jnp.int32)
  if key_idx.ndim == 1:
    ok = (key_idx[None, None, :] <= t_Q[None, :, None])
    if seg_k_BxS is not None:
      ok = ok & (seg_q_BxQ[:, :, None] == seg_k_BxS[:, None, :])
    return ok
  ok = key_idx <= t_Q[None, :, None]
  if seg_k_BxS is not None:
    seg_sel = jnp.take_along_axis(seg_k_BxS[:, None, :], key_idx.reshape(
        key_idx.shape[0], 1, -1), axis=-1).reshape(key_idx.shape)
    ok = ok & (seg_q_BxQ[:, :, None] == seg_sel)
  return ok


def _gather_rows(x_BxSxX: jax.Array, idx_BxQxK: jax.Array) -> jax.Array:
  """x[b, idx[b, q, k]] -> [B, Q, K, X]."""
  return jax.vmap(lambda x, i: x[i])(x_BxSxX, idx_BxQxK)


def over_causal_bands(fn, chunk: int, T: int, S: int, min_keys: int, bands: int, *per_query):
  """`over_query_chunks` for causal queries at positions 0..T-1 over keys 0..S-1 (a key
  after its query is never used): fn(t0, extent, *arrays [B, Q, ...]) with a static
  `extent`, the keys its chunk may need. The chunks are split into up to `bands` runs,
  each its own `lax.map` whose chunks see keys [0, extent): the band's last query + 1,
  rounded up to a whole chunk, at least `min_keys` (a top-k's k), at most S. A chunk's
  O(Q S) work (index scores, top-k passes) then covers about (bands + 1) / (2 bands) of the
  square instead of all of it."""
  Q = min(chunk, T)
  n = -(-T // Q)
  per_band = -(-n // max(1, min(bands, n)))
  outs = []
  for c0 in range(0, n, per_band):
    c1 = min(n, c0 + per_band)
    extent = min(S, max(c1 * Q, -(-min_keys // Q) * Q))
    lo, hi = c0 * Q, min(T, c1 * Q)
    part = [a[:, lo:hi] for a in per_query]
    outs.append(over_query_chunks(
        lambda t0, *a, lo=lo, extent=extent: fn(t0 + lo, extent, *a), chunk, hi - lo, *part))
  if len(outs) == 1:
    return outs[0]
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *outs)


# ----------------------------------------------------------------------------- indexer


def index_scores(q_BxQxJxI, w_BxQxJ, k_BxSxI) -> jax.Array:
  """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]): [B, Q, S] float32 (unmasked). A zero
  score is +0.0 (a negative weight times ReLU's 0 is -0.0, and whether a sum of such keeps
  the sign depends on how it is summed: XLA folds 0 + x): every implementation, the top-k
  kernel's too, then orders zero scores alike."""
  dots = jnp.einsum("bqji,bsi->bqjs", q_BxQxJxI, k_BxSxI, preferred_element_type=jnp.float32)
  s = jnp.einsum("bqjs,bqj->bqs", jax.nn.relu(dots), w_BxQxJ.astype(jnp.float32))
  return jnp.where(s == 0, 0.0, s)


def _order_key(x: jax.Array) -> jax.Array:
  """float32 -> uint32 in the total order `jax.lax.top_k` compares by (-inf lowest, -0.0
  below 0.0; NaN not expected)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def top_k_positions(x_NxS: jax.Array, k: int, *, digit_bits: int = 4) -> jax.Array:
  """The positions [N, k] int32 of each row's k largest entries, in increasing position
  order: the set `jax.lax.top_k(x, k)[1]` returns (ties at the k-th value go to the lower
  positions, as there), without sorting the row.

  XLA's top_k at DSA's sizes (k = 2048 of up to 128k keys a query) sorts every row; this
  reads the row once per `digit_bits` bits of the k-th value's order key (8 passes of 15
  comparisons an entry at 4 bits: each pass one fused compare-and-count reduction), then
  once to mark the entries above it (and the first ties) and to place them
  (`cumsum`, a scatter of k positions a row). Not differentiable (positions only)."""
  N, S = x_NxS.shape
  if not 0 < k <= S:
    raise ValueError(f"k={k}: must be between 1 and the row length {S}")
  if digit_bits not in (1, 2, 4, 8):
    raise ValueError(f"digit_bits={digit_bits}: must divide the key's 32 bits (1, 2, 4 or 8)")
  return _top_positions(_order_key(x_NxS), k, digit_bits)


def _kth_key(key_NxS: jax.Array, k: int, digit_bits: int = 4) -> jax.Array:
  """Each row's k-th largest order key [N] uint32, digit by digit from the top (a pass of
  2^digit_bits - 1 compare-and-counts an entry per digit)."""
  ways = 1 << digit_bits
  digits = jnp.arange(1, ways, dtype=jnp.uint32)
  prefix = jnp.zeros(key_NxS.shape[:1], jnp.uint32)
  for shift in range(32 - digit_bits, -1, -digit_bits):
    cand_NxW = prefix[:, None] | (digits[None, :] << shift)
    count_NxW = jnp.sum(key_NxS[:, :, None] >= cand_NxW[:, None, :], axis=1, dtype=jnp.int32)
    d = jnp.sum(count_NxW >= k, axis=1, dtype=jnp.uint32)  # counts fall as digits rise
    prefix = prefix | (d << shift)
  return prefix


def _top_positions(key_NxS: jax.Array, k: int, digit_bits: int = 4) -> jax.Array:
  """`top_k_positions` on order keys."""
  N, S = key_NxS.shape
  kth_N = _kth_key(key_NxS, k, digit_bits)
  above = key_NxS > kth_N[:, None]
  tie = key_NxS == kth_N[:, None]
  room = k - jnp.sum(above, axis=1, dtype=jnp.int32)  # >= 1: the k-th value is a tie
  take = above | (tie & (jnp.cumsum(tie, axis=1, dtype=jnp.int32) <= room[:, None]))
  slot = jnp.where(take, jnp.cumsum(take, axis=1, dtype=jnp.int32) - 1, k)
  rows = jnp.broadcast_to(jnp.arange(N)[:, None], (N, S))
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (N, S))
  return jnp.zeros((N, k), jnp.int32).at[rows, slot].set(pos, mode="drop")


def top_k_threshold(x_NxS: jax.Array, k: int, *, sample: int = 8192,
                    oversample: float = 2.0, cap_factor: int = 8) -> jax.Array:
  """`top_k_positions(x, k)` exactly (the same positions, rising), touching the whole row
  only a few times and never sorting.

  As `top_k_sampled`: a strided sample of ~`sample` entries a row gives a threshold that
  ~`oversample` * k of the row's entries reach (here the sample's ks-th largest key by
  `_kth_key`, not a top_k of the sample), those entries are compacted in position order
  into a buffer of `cap_factor` * k; then the radix select of `top_k_positions` runs on
  the buffer (8k entries a row, not S: at DSA's 2048 of 128k keys a query, 1/8 of the
  row) instead of top_k's sort of it. Rows whose threshold let through fewer than k or
  more than the buffer's entries (causal rows with few keys; a sample unlike its row;
  ties: a ReLU index score is exactly 0 for ~1/16 of the keys when all of a query's head
  weights are negative): all of `x` takes `top_k_positions` (a `lax.cond`), so the result
  is exact either way. The buffer is 2x `top_k_sampled`'s because its radix select costs
  little more at 8k, and each chunk that misses costs a full radix select (on the H200 at
  128k, 186 of 512 chunks missed with a 4k buffer). Where the buffer would hold the whole
  row (S <= cap_factor * k: at DSA's k = 2048, rows of up to 16k keys, e.g. the first
  causal bands) the radix select runs on the row itself: the sample, its search and the
  compaction would only add passes. Not differentiable."""
  N, S = x_NxS.shape
  if not 0 < k <= S:
    raise ValueError(f"k={k}: must be between 1 and the row length {S}")
  key_NxS = _order_key(x_NxS)
  if S <= cap_factor * k:
    return _top_positions(key_NxS, k)
  stride = max(1, S // sample)
  key_sample = key_NxS[:, ::stride]
  ks = min(key_sample.shape[1], max(1, round(oversample * k / stride)))
  tau_N = _kth_key(key_sample, ks)
  cap = cap_factor * k
  cand_NxC, count_N = _compact(key_NxS >= tau_N[:, None], cap)
  filled = jnp.arange(cap)[None, :] < count_N[:, None]
  # empty slots get key 0, below every real entry's (-inf's key is 0x007fffff)
  ckey_NxC = jnp.where(filled, jnp.take_along_axis(key_NxS, cand_NxC, axis=1), 0)
  fast_NxK = jnp.take_along_axis(cand_NxC, _top_positions(ckey_NxC, k), axis=1)
  ok = jnp.all((count_N >= k) & (count_N <= cap))
  return jax.lax.cond(ok, lambda: fast_NxK, lambda: _top_positions(key_NxS, k))


def _compact(take_NxS: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
  """The positions of each row's taken entries, in order, in a buffer [N, cap] int32 (slots
  past the row's count hold 0; entries past cap are dropped) and the counts [N]."""
  N, S = take_NxS.shape
  count_N = jnp.sum(take_NxS, axis=1, dtype=jnp.int32)
  slot_NxS = jnp.where(take_NxS, jnp.cumsum(take_NxS, axis=1, dtype=jnp.int32) - 1, cap)
  rows = jnp.broadcast_to(jnp.arange(N)[:, None], (N, S))
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (N, S))
  return jnp.zeros((N, cap), jnp.int32).at[rows, slot_NxS].set(pos, mode="drop"), count_N


_NEG_INF_KEY = 0x007FFFFF  # _order_key(-inf): a masked entry's


def _indexer_backend() -> str:
  """top_k_fused's "auto": the GPU kernels on a GPU where they take whole arrays
  (`_kernels_run_here`: no mesh of several devices, or inside `sparse_stage`'s shard_map;
  XLA cannot partition their custom calls), else the XLA reference."""
  on_gpu = jax.default_backend() == "gpu"
  return "kernel" if on_gpu and _kernels_run_here() else "reference"


def top_k_fused(q_BxQxJxI, w_BxQxJ, k_BxSxI, t0, k: int, seg_q_BxQ=None, seg_k_BxS=None, *,
                sample: int = 8192, oversample: float = 2.0, cap_factor: int = 8,
                digit_bits: int = 4, impl: str = "auto") -> jax.Array:
  """`top_k_threshold` of the indexer's masked scores for queries at t0.. over keys
  [0, S) (S = k's length), without the [B, Q, S] scores: positions [B, Q, k] int32, each
  query's k best allowed keys by rising position (those of `top_k_positions` on the
  scores `index_scores` gives, up to their float32 rounding, ties to lower positions).

  The threshold comes, as there, from the scores of a strided sample of keys (an XLA
  product over S / stride keys) and their ks-th largest; the candidates at or above it, in
  position order, from `pallas_kernels.indexer_gpu.threshold_candidates`; then the
  radix select on the candidates. impl "kernel": the GPU kernels of
  `pallas_kernels.indexer_gpu` (the candidates' scores and compaction, never written
  out; the sample's threshold and the candidates' select a row a program, the row in
  registers, up to `indexer_gpu.MAX_ROW` keys: longer rows take the XLA radix);
  "interpret": them in the interpreter; "reference": the same in XLA (`_kth_key`,
  `_top_positions` with `digit_bits`); "auto": the kernels on a GPU with no mesh of
  several devices, else the reference. A chunk whose
  threshold let through fewer than k or more than cap_factor * k of some row's keys (or
  whose sample had fewer than its quota of allowed keys) takes `top_k_positions` of its
  whole scores instead (`lax.cond`): exact either way. Rows of at most cap_factor * k keys
  go to the radix select directly, as in `top_k_threshold`. digit_bits: the radix
  selects' (`top_k_positions`). Not differentiable."""
  from pallas_kernels import indexer_gpu

  if impl not in ("auto", "kernel", "interpret", "reference"):
    raise ValueError(f"top_k_fused impl={impl!r}: must be auto, kernel, interpret or reference")
  B, Q = q_BxQxJxI.shape[:2]
  S = k_BxSxI.shape[1]
  if not 0 < k <= S:
    raise ValueError(f"k={k}: must be between 1 and the keys' length {S}")
  if digit_bits not in (1, 2, 4, 8) or cap_factor < 1 or oversample < 1 or sample < 1:
    raise ValueError(f"top_k_fused: digit_bits={digit_bits} must be 1, 2, 4 or 8, "
                     f"cap_factor={cap_factor}, oversample={oversample} and sample={sample} "
                     "at least 1")
  if impl == "auto":
    impl = _indexer_backend()
  if impl != "reference" and (reason := indexer_gpu.unsupported_reason(q_BxQxJxI.shape[-1])):
    raise ValueError(f"top_k_fused impl={impl!r}: {reason}")
  # the row selects hold a row in registers: longer rows take the XLA radix
  row_kernel = impl != "reference" and cap_factor * k <= indexer_gpu.MAX_ROW

  def whole_rows():  # top_k_positions of the chunk's masked scores
    s_BxQxS = index_scores(q_BxQxJxI, w_BxQxJ, k_BxSxI)
    ok = _allowed(t0, Q, jnp.arange(S, dtype=jnp.int32), seg_q_BxQ, seg_k_BxS)
    key_NxS = _order_key(jnp.where(ok, s_BxQxS, -jnp.inf)).reshape(B * Q, S)
    if impl != "reference" and S <= indexer_gpu.MAX_ROW:
      return indexer_gpu.top_positions(key_NxS, k, interpret=impl == "interpret").reshape(
          B, Q, k)
    return _top_positions(key_NxS, k, digit_bits).reshape(B, Q, k)

  if S <= cap_factor * k:
    return whole_rows()
  # (Named scopes: profiles group kernels by them, benchmarks/dsa.py --profile.)
  with jax.named_scope("sample"):
    stride = max(1, S // sample)
    at_M = jnp.arange(0, S, stride, dtype=jnp.int32)
    s_BxQxM = index_scores(q_BxQxJxI, w_BxQxJ, k_BxSxI[:, ::stride])
    ok_BxQxM = _allowed(t0, Q, at_M, seg_q_BxQ,
                        None if seg_k_BxS is None else seg_k_BxS[:, ::stride])
    key_sample = _order_key(jnp.where(ok_BxQxM, s_BxQxM, -jnp.inf)).reshape(B * Q, -1)
    ks = min(key_sample.shape[1], max(1, round(oversample * k / stride)))
    if impl == "reference" or key_sample.shape[1] > indexer_gpu.MAX_ROW:
      tau_BxQ = _kth_key(key_sample, ks, digit_bits).reshape(B, Q)
    else:
      tau_BxQ = indexer_gpu.kth_largest(key_sample, ks,
                                           interpret=impl == "interpret").reshape(B, Q)
  cap = cap_factor * k
  q_BxJxQxI = jnp.swapaxes(q_BxQxJxI, 1, 2)
  w_BxJxQ = jnp.swapaxes(w_BxQxJ, 1, 2)
  with jax.named_scope("candidates"):
    if impl == "reference":
      cand, ckey, count_BxQ = indexer_gpu.reference(
          q_BxJxQxI, w_BxJxQ, k_BxSxI, tau_BxQ, t0, seg_q_BxQ, seg_k_BxS, extent=S, cap=cap)
    else:
      cand, ckey, count_BxQ = indexer_gpu.threshold_candidates(
          q_BxJxQxI, w_BxJxQ, k_BxSxI, tau_BxQ, t0, seg_q_BxQ, seg_k_BxS, extent=S, cap=cap,
          interpret=impl == "interpret")
  # Only allowed keys are candidates: a row whose threshold is -inf's key would take its
  # masked keys as well in `top_k_threshold` (all S > cap of them): a miss there too.
  hit = (tau_BxQ > _NEG_INF_KEY) & (count_BxQ >= k) & (count_BxQ <= cap)
  with jax.named_scope("radix"):
    if not row_kernel:
      top = _top_positions(ckey.reshape(B * Q, cap), k, digit_bits).reshape(B, Q, k)
      fast_BxQxK = jnp.take_along_axis(cand, top, axis=-1)
    else:
      fast_BxQxK = indexer_gpu.top_positions(
          ckey.reshape(B * Q, cap), k, cand.reshape(B * Q, cap),
          interpret=impl == "interpret").reshape(B, Q, k)
  with jax.named_scope("fallback"):
    return jax.lax.cond(jnp.all(hit), lambda: fast_BxQxK, whole_rows)


def top_k_sampled(x_NxS: jax.Array, k: int, *, sample: int = 8192,
                  oversample: float = 2.0, compact: str = "scatter") -> jax.Array:
  """`jax.lax.top_k(x, k)[1]` exactly (the same positions in the same order: falling value,
  ties to the lower position), sorting only a few candidates a row instead of the row.

  A strided sample of ~`sample` entries a row gives a threshold: the value that
  `oversample` * k entries of the row should reach (the sample's top ks, ks = oversample *
  k / stride). The entries at or above it (compared in top_k's total order) are compacted,
  in position order, into a buffer of 4k (`cumsum` and a scatter), and top_k of that
  buffer is top_k of the row whenever it holds at least k entries and no more than 4k
  (`_top_k_of_candidates`). At DSA's k = 2048 of 128k keys: ks = 256 sampled of 8,192,
  ~4,096 candidates +- 6%, so a row of scores misses only when its sample is unlike it. When any row of `x` misses that (few valid entries, as a
  causal row's first keys; a sample unlike its row), all of `x` takes `jax.lax.top_k`
  instead (`lax.cond`), so the result is exact either way. Not differentiable.
  compact: how the candidates reach the buffer: "scatter" (each of the row's S entries
  scattered to its slot, the others dropped) or "search" (each of the 4k slots finds its
  entry by a binary search of the row's running count: 4k x log2(S) gathers instead of S
  scattered writes); the same result, their speed on the GPU to compare
  (benchmarks/dsa.py topk_sample_search)."""
  N, S = x_NxS.shape
  if not 0 < k <= S:
    raise ValueError(f"k={k}: must be between 1 and the row length {S}")
  if compact not in ("scatter", "search"):
    raise ValueError(f"compact={compact!r}: must be 'scatter' or 'search'")
  fast_NxK, ok_N = _top_k_of_candidates(x_NxS, k, sample=sample, oversample=oversample,
                                        compact=compact)
  return jax.lax.cond(jnp.all(ok_N), lambda: fast_NxK,
                      lambda: jax.lax.top_k(x_NxS, k)[1].astype(jnp.int32))


def _top_k_of_candidates(x_NxS, k: int, *, sample: int, oversample: float,
                         compact: str = "scatter"):
  """`top_k_sampled`'s fast path: positions [N, k] int32 and, per row, whether they are
  top_k's (the threshold let through between k and 4k entries)."""
  N, S = x_NxS.shape
  stride = max(1, S // sample)
  key_NxS = _order_key(x_NxS)
  key_sample = key_NxS[:, ::stride]
  ks = min(key_sample.shape[1], max(1, round(oversample * k / stride)))
  tau_N = jax.lax.top_k(key_sample, ks)[0][:, -1]  # the ks-th largest sampled key
  cap = min(S, 4 * k)
  take_NxS = key_NxS >= tau_N[:, None]
  if compact == "search":  # slot c holds the first position whose running count is c + 1
    count_N = jnp.sum(take_NxS, axis=1, dtype=jnp.int32)
    running_NxS = jnp.cumsum(take_NxS, axis=1, dtype=jnp.int32)
    want_C = jnp.arange(1, cap + 1, dtype=jnp.int32)
    cand_NxC = jax.vmap(lambda r: jnp.searchsorted(r, want_C, side="left",
                                                   method="scan_unrolled"))(running_NxS)
    cand_NxC = jnp.minimum(cand_NxC, S - 1).astype(jnp.int32)  # slots past the count: unused
  else:
    cand_NxC, count_N = _compact(take_NxS, cap)
  filled = jnp.arange(cap)[None, :] < count_N[:, None]
  vals = jnp.where(filled, jnp.take_along_axis(x_NxS, cand_NxC, axis=1), -jnp.inf)
  # the padding (-inf) sits after the candidates: a tie with it goes to the real entry
  fast_NxK = jnp.take_along_axis(cand_NxC, jax.lax.top_k(vals, k)[1], axis=1)
  return fast_NxK.astype(jnp.int32), (count_N >= k) & (count_N <= cap)


FUSED_CHUNK = 2048  # the fused top-k's queries a chunk (at least)


def select_topk(q_BxTxJxI, w_BxTxJ, k_BxSxI, *, topk: int, chunk: int,
                segment_ids_BxT: jax.Array | None = None, method: str = "sort",
                _compact: str = "scatter", scores: str = "auto", bands: int = 4,
                fused_impl: str = "auto", fused_chunk: int = FUSED_CHUNK,
                fused_options: dict | None = None):
  """Each query's top-k keys by index score among the keys it may attend to.

  Returns idx [B,T,K] int32, valid [B,T,K] bool, score [B,T,K] float32 with K = min(topk, S).
  Queries with fewer than K allowed keys (the first K-1 positions, short sequences) get
  every allowed key, the rest of their K slots marked invalid. `score` is differentiable in
  the indexer's outputs (the selection itself is not). method: "sort" (`jax.lax.top_k`,
  keys by falling score), "radix" (`top_k_positions`, the same set by rising position),
  "sample" (`top_k_sampled`: top_k's result, sorting ~2k candidates a row; `_compact` is
  its compaction, for benchmarks/dsa.py), "threshold" (`top_k_threshold`: radix's
  result, found among ~2k candidates a row, no sort) or "fused" (`top_k_fused`:
  threshold's, the scores and candidates from a GPU kernel that never writes the scores
  out (`fused_impl`, "auto": on a GPU); its chunks of max(chunk, fused_chunk) queries, as
  its memory is O(chunk x 8 topk), not O(chunk x S); `fused_options`: top_k_fused's
  sample, oversample, cap_factor, digit_bits, for benchmarks).

  scores: how the selected keys' (differentiable) scores are computed: "dense" (a chunk's
  index scores, then those of its selected keys; the backward recomputes the chunk's
  O(Q S) scores), "gather" (the selected keys' index keys gathered, O(Q K); the backward
  scatter-adds into the keys' gradient), "kernel" (`pallas_kernels.indexer_gpu.
  selected_scores`: a GPU kernel a query gathers its keys' index rows itself, the backward
  adds the keys' gradient by float32 atomics; "interpret": it in the interpreter, for
  tests) or "auto": the kernel where the fused top-k's kernels run (`_indexer_backend`: on
  a GPU where they take whole arrays; an index dim they take), else gather from S >= 32 K
  keys. On the H200 (DSA fwd+bwd, K = 2048, ninth session) gather took 1,499 ms against
  1,768 at 128k, the same at 64k (636 / 645), and lost at 32k (304 / 274) and 16k (150 /
  120): its scatter-add grows with T K, the dense backward with T S; the kernel against
  gather, with the fused top-k (twenty-first session): 371 ms against 446 at 64k, 865
  against 995 at 128k; 343 and 800 with its adds relaxed.

  bands: the query chunks run in up to this many causal bands, each over only the keys
  its queries may see (`over_causal_bands`; 1: every chunk over all S keys). Queries are
  at positions 0..T-1 and keys at 0..S-1, as in the forward pass. The valid entries are the
  same for any `bands`; the invalid slots of a query with fewer than K keys point at other
  (masked) keys.
  """
  if method not in DSA_TOPK_METHODS:
    raise ValueError(f"top-k method {method!r}: must be one of {DSA_TOPK_METHODS}")
  if scores not in ("auto", "dense", "gather", "kernel", "interpret"):
    raise ValueError(f"scores={scores!r}: must be 'auto', 'dense', 'gather', 'kernel' or "
                     "'interpret'")
  B, T = q_BxTxJxI.shape[:2]
  S = k_BxSxI.shape[1]
  K = min(topk, S)
  if scores == "auto":
    from pallas_kernels import indexer_gpu

    kernel_ok = (_indexer_backend() == "kernel"
                 and indexer_gpu.unsupported_reason(q_BxTxJxI.shape[-1]) is None)
    scores = "kernel" if kernel_ok else "gather" if S >= 32 * K else "dense"
  seg = segment_ids_BxT if segment_ids_BxT is not None else jnp.zeros((B, T), jnp.int32)
  sg = jax.lax.stop_gradient

  def select_fn(t0, S, q_BxQxJxI, w_BxQxJ, seg_BxQ):  # S: the keys this chunk may need
    Q = q_BxQxJxI.shape[1]
    seg_k = None if segment_ids_BxT is None else segment_ids_BxT[:, :S]
    if method == "fused":
      idx_BxQxK = top_k_fused(q_BxQxJxI, w_BxQxJ, sg(k_BxSxI[:, :S]), t0, K,
                              None if seg_k is None else seg_BxQ, seg_k, impl=fused_impl,
                              **(fused_options or {}))
      return idx_BxQxK, _allowed(t0, Q, idx_BxQxK, seg_BxQ, seg_k)
    s_BxQxS = index_scores(q_BxQxJxI, w_BxQxJ, sg(k_BxSxI[:, :S]))
    ok_BxQxS = _allowed(t0, Q, jnp.arange(S, dtype=jnp.int32), seg_BxQ, seg_k)
    masked = jnp.where(ok_BxQxS, s_BxQxS, -jnp.inf)
    if method == "sort":
      _, idx_BxQxK = jax.lax.top_k(masked, K)
    elif method == "sample":
      Bq = masked.shape[:2]
      idx_BxQxK = top_k_sampled(masked.reshape(-1, S), K, compact=_compact).reshape(*Bq, K)
    elif method == "threshold":
      Bq = masked.shape[:2]
      idx_BxQxK = top_k_threshold(masked.reshape(-1, S), K).reshape(*Bq, K)
    else:
      Bq = masked.shape[:2]
      idx_BxQxK = top_k_positions(masked.reshape(-1, S), K).reshape(*Bq, K)
    valid = jnp.take_along_axis(ok_BxQxS, idx_BxQxK, axis=-1)
    return idx_BxQxK.astype(jnp.int32), valid

  def score_fn(t0, S, q_BxQxJxI, w_BxQxJ, idx_BxQxK):
    if scores == "gather":
      k_BxQxKxI = _gather_rows(k_BxSxI, idx_BxQxK)
      dots = jnp.einsum("bqji,bqki->bqjk", q_BxQxJxI, k_BxQxKxI,
                        preferred_element_type=jnp.float32)
      return jnp.einsum("bqjk,bqj->bqk", jax.nn.relu(dots), w_BxQxJ.astype(jnp.float32))
    return jnp.take_along_axis(index_scores(q_BxQxJxI, w_BxQxJ, k_BxSxI[:, :S]), idx_BxQxK,
                               -1)

  # The selection without gradients (so the backward pass does not run the top-k again, as
  # it would rematerialising one chunk function for both), then the selected keys' scores,
  # differentiable ("dense": their chunks' backward recomputes the index scores, and the
  # forward computes them twice; "gather": O(T K I), a scatter-add in the backward). The
  # chunks run in causal bands: a chunk computes scores only for the keys its band's
  # queries may see (`over_causal_bands`: ~5/8 of the T x S square at 4 bands).
  # (Named scopes: profiles group kernels by them, benchmarks/dsa.py --profile.)
  with jax.named_scope("dsa_topk"):
    idx_BxTxK, valid_BxTxK = over_causal_bands(
        select_fn, max(chunk, fused_chunk) if method == "fused" else chunk, T, S, K, bands,
        sg(q_BxTxJxI), sg(w_BxTxJ), seg)
  # named for remat policies (model.remat=save_dsa_selection keeps it: no top-k again in
  # the backward pass, where the selected scores' and the attention's gradients use it)
  idx_BxTxK, valid_BxTxK = checkpoint_name((idx_BxTxK, valid_BxTxK), "dsa_selection")
  with jax.named_scope("dsa_selected_scores"):
    if scores in ("kernel", "interpret"):  # no [Q, K, I] gather: no chunks
      from pallas_kernels import indexer_gpu

      score_BxTxK = indexer_gpu.selected_scores(q_BxTxJxI, w_BxTxJ, k_BxSxI, idx_BxTxK,
                                                interpret=scores == "interpret")
    else:
      score_BxTxK = over_causal_bands(score_fn, chunk, T, S, K, bands, q_BxTxJxI, w_BxTxJ,
                                      idx_BxTxK)
  return idx_BxTxK, valid_BxTxK, score_BxTxK


# ----------------------------------------------------------------------------- attention


def _masked_softmax(logits, ok):
  return jax.nn.softmax(jnp.where(ok, logits, _MASKED), axis=-1)


SPARSE_MLA_IMPLS = DSA_IMPLS


def _logits(q_lat, q_rope, sel_BxQxKxCR, C: int, scale: float):
  return (jnp.einsum("bqhc,bqkc->bqhk", q_lat, sel_BxQxKxCR[..., :C],
                     preferred_element_type=jnp.float32)
          + jnp.einsum("bqhr,bqkr->bqhk", q_rope, sel_BxQxKxCR[..., C:],
                       preferred_element_type=jnp.float32)) * scale


def resolve_sparse_mla_impl(impl: str, H: int, C: int, R: int, K: int, dtype) -> str:
  """"auto" → on a Hopper GPU where the kernels take whole arrays (`_kernels_run_here`: no
  mesh of several devices, or inside `sparse_stage`'s shard_map over the batch; under
  plain jit over several devices XLA cannot partition the custom calls): "pallas_mma_bwd"
  (the 16-row MMA kernels, forward and backward: on the H200 2.2-3x the wgmma forward's
  speed and 2.3x the fwd+bwd with the pure-JAX backward) when they take these shapes, else
  "pallas" when the wgmma forward does, else "reference"; an explicit kernel impl with
  shapes it cannot take is an error."""
  if impl not in SPARSE_MLA_IMPLS:
    raise ValueError(f"unknown sparse_mla impl {impl!r}; choose from {SPARSE_MLA_IMPLS}")
  if impl == "reference":
    return impl
  import pallas_kernels as pk  # the kernels' modules only when asked for
  from pallas_kernels import sparse_mla_gpu, sparse_mla_mma_gpu

  if impl == "auto":
    if pk.resolve_backend("auto") != "mosaic_gpu" or not _kernels_run_here():
      return "reference"
    if sparse_mla_mma_gpu.unsupported_reason(H, C, R, K, dtype) is None:
      return "pallas_mma_bwd"
    return "pallas" if sparse_mla_gpu.unsupported_reason(H, C, R, K, dtype) is None \
        else "reference"
  kernel = sparse_mla_mma_gpu if "_mma" in impl else sparse_mla_gpu
  reason = kernel.unsupported_reason(H, C, R, K, dtype)
  if reason:
    raise ValueError(reason)
  return impl


def sparse_mla(q_lat_BxTxHxC, q_rope_BxTxHxR, c_BxSxC, k_rope_BxSxR, idx_BxTxK, valid_BxTxK, *,
               scale: float, chunk: int, impl: str = "reference", _probs: str = "steps"):
  """MLA in latent form over each query's selected keys.

  score[t, h, k] = scale (q_lat[t, h] . c[idx[t, k]] + q_rope[t, h] . k_rope[idx[t, k]]),
  softmax over the valid k, o_lat[t, h] = sum_k p c[idx[t, k]]. Returns o_lat [B,T,H,C]
  (compute dtype) and the head-summed probabilities p [B,T,K] / H (float32,
  stop-gradient: the indexer KL's target). Gathers per chunk of `chunk` queries.

  impl: "reference" (pure JAX, below), "pallas" (pallas_kernels/sparse_mla_gpu.py: the
  forward o_lat is the Mosaic GPU kernel; its backward and p are pure JAX, see
  `_sparse_mla_kernel`), "interpret" (that kernel in the GPU interpreter, for tests on
  CPU), "pallas_mma" / "interpret_mma" (the same with the 16-row MMA kernel,
  pallas_kernels/sparse_mla_mma_gpu.py: 16 heads, bf16), "pallas_mma_bwd" /
  "interpret_mma_bwd" (that kernel's backward too, `sparse_mla_mma_gpu.sparse_mla_bwd`), "auto"
  (`resolve_sparse_mla_impl`). With the kernel, a query with no valid key at
  all gets the uniform average of its sequence's row 0 (the reference: of its idx rows).
  _probs (the MMA kernels' p): "steps" (the default: the forward kernel's own P and maxima,
  `sparse_mla_mma_gpu.probs_from_steps`; p within 2^-8 of the float32 form, bf16 P) or
  "kernel" (`sparse_mla_probs`, a second pass over the keys). DSA fwd+bwd on one H200
  with "steps": 65.2 / 314.8 / 751.9 ms at 16k / 64k / 128k against 71.3 / 342.5 / 804.3
  (twenty-third session, benchmarks/notes_dsa.md).
  """
  if _probs not in ("kernel", "steps"):
    raise ValueError(f"sparse_mla: _probs={_probs!r}: must be 'kernel' or 'steps'")
  with jax.named_scope("dsa_sparse_mla"):
    return _sparse_mla(q_lat_BxTxHxC, q_rope_BxTxHxR, c_BxSxC, k_rope_BxSxR, idx_BxTxK,
                       valid_BxTxK, scale=scale, chunk=chunk, impl=impl, probs=_probs)


def _sparse_mla(q_lat_BxTxHxC, q_rope_BxTxHxR, c_BxSxC, k_rope_BxSxR, idx_BxTxK, valid_BxTxK, *,
                scale: float, chunk: int, impl: str, probs: str = "steps"):
  T, H = q_lat_BxTxHxC.shape[1], q_lat_BxTxHxC.shape[2]
  ckr_BxSxCR = jnp.concatenate([c_BxSxC, k_rope_BxSxR.astype(c_BxSxC.dtype)], -1)
  C = c_BxSxC.shape[-1]
  impl = resolve_sparse_mla_impl(impl, H, C, q_rope_BxTxHxR.shape[-1], idx_BxTxK.shape[-1],
                                 q_lat_BxTxHxC.dtype)
  if impl != "reference":
    return _sparse_mla_kernel(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK,
                              valid_BxTxK, scale=scale, chunk=chunk,
                              interpret=impl.startswith("interpret"),
                              mma="_mma" in impl, kernel_bwd=impl.endswith("_bwd"),
                              probs=probs)

  def chunk_fn(t0, q_lat, q_rope, idx, valid):
    sel_BxQxKxCR = _gather_rows(ckr_BxSxCR, idx)
    p_BxQxHxK = _masked_softmax(_logits(q_lat, q_rope, sel_BxQxKxCR, C, scale),
                                valid[:, :, None, :])
    o = jnp.einsum("bqhk,bqkc->bqhc", p_BxQxHxK.astype(c_BxSxC.dtype), sel_BxQxKxCR[..., :C])
    return o, jax.lax.stop_gradient(p_BxQxHxK.sum(2) / H)

  return over_query_chunks(chunk_fn, chunk, T, q_lat_BxTxHxC, q_rope_BxTxHxR, idx_BxTxK,
                           valid_BxTxK)


def _sparse_mla_kernel(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, valid_BxTxK, *,
                       scale: float, chunk: int, interpret: bool, mma: bool = False,
                       kernel_bwd: bool = False, probs: str = "steps"):
  """o_lat from the Mosaic GPU forward kernel (mma: the 16-row MMA one), under a custom VJP
  whose backward is, from the kernel's o and LSE, the MMA kernel's backward
  (`sparse_mla_mma_gpu.sparse_mla_bwd`) with kernel_bwd, else pure JAX (`_sparse_mla_bwd`).
  p (the KL target) is recomputed from the LSE: by the MMA kernel's probabilities form
  (`sparse_mla_mma_gpu.sparse_mla_probs`) with mma, else in pure JAX (one chunked gather
  and score product); with mma and probs="steps" from the forward kernel's own P and
  maxima (`step_probs`, `sparse_mla_mma_gpu.probs_from_steps`: no second pass)."""
  from pallas_kernels import sparse_mla_gpu, sparse_mla_mma_gpu

  forward = (sparse_mla_mma_gpu if mma else sparse_mla_gpu).sparse_mla_fwd

  T, H, C = q_lat_BxTxHxC.shape[1:]
  sg = jax.lax.stop_gradient
  step_probs = mma and probs == "steps"
  kw = {"step_probs": True} if step_probs else {}

  @jax.custom_vjp
  def attend(q_lat, q_rope, ckr, idx, valid):
    return forward(q_lat, q_rope, ckr, jnp.where(valid, idx, -1), scale=scale,
                   interpret=interpret, **kw)

  def fwd(q_lat, q_rope, ckr, idx, valid):
    outs = attend(q_lat, q_rope, ckr, idx, valid)
    return outs, (q_lat, q_rope, ckr, idx, valid, outs[0], outs[1])

  def bwd(res, g):
    g_o = g[0]  # the LSE (and the step outputs) leave this function under stop_gradient
    if not kernel_bwd:
      return (*_sparse_mla_bwd(*res, g_o, scale=scale, chunk=chunk), None, None)
    q_lat, q_rope, ckr, idx, valid, o, lse = res
    delta_BxTxH = jnp.sum(g_o.astype(jnp.float32) * o.astype(jnp.float32), -1)
    dq_lat, dq_rope, dckr = sparse_mla_mma_gpu.sparse_mla_bwd(
        q_lat, q_rope, ckr, jnp.where(valid, idx, -1), lse, g_o.astype(q_lat.dtype),
        delta_BxTxH, scale=scale, interpret=interpret)
    return dq_lat, dq_rope, dckr.astype(ckr.dtype), None, None

  attend.defvjp(fwd, bwd)
  o_BxTxHxC, lse_BxTxH, *steps = attend(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR,
                                        idx_BxTxK, valid_BxTxK)
  lse_BxTxH, sg_ckr = sg(lse_BxTxH), sg(ckr_BxSxCR)
  if step_probs:
    p_BxTxK = sparse_mla_mma_gpu.probs_from_steps(*map(sg, steps), lse_BxTxH,
                                                  jnp.where(valid_BxTxK, idx_BxTxK, -1))
    return o_BxTxHxC, sg(p_BxTxK)
  if mma:  # the kernel's second form: the same gather and scores, P summed over heads
    p_BxTxK = sparse_mla_mma_gpu.sparse_mla_probs(
        sg(q_lat_BxTxHxC), sg(q_rope_BxTxHxR), sg_ckr, jnp.where(valid_BxTxK, idx_BxTxK, -1),
        lse_BxTxH, scale=scale, interpret=interpret)
    return o_BxTxHxC, sg(p_BxTxK)

  def chunk_fn(t0, q_lat, q_rope, idx, valid, lse_BxQxH):
    logits = _logits(q_lat, q_rope, _gather_rows(sg_ckr, idx), C, scale)
    p = jnp.where(valid[:, :, None, :], jnp.exp(logits - lse_BxQxH[..., None]), 0.0)
    return p.sum(2) / H

  p_BxTxK = over_query_chunks(chunk_fn, chunk, T, sg(q_lat_BxTxHxC), sg(q_rope_BxTxHxR),
                              idx_BxTxK, valid_BxTxK, lse_BxTxH)
  return o_BxTxHxC, p_BxTxK


def _sparse_mla_bwd(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, valid_BxTxK,
                    o_BxTxHxC, lse_BxTxH, g_BxTxHxC, *, scale: float, chunk: int):
  """The gradients of o_lat in (q_lat, q_rope, ckr) from the forward's o and LSE (flash
  attention's backward, per chunk of queries): p = exp(score - lse) on valid keys,
  ds = p (g·c_sel - Σ_c g o) scale, dq = ds·[c | k_rope]_sel, d[c | k_rope]_sel = dsᵀq
  (+ pᵀg on c), scattered into dckr [B,S,C+R] (float32), the carry of a scan over chunks.
  Query padding (T up to a multiple of the chunk) is invalid everywhere, so contributes 0."""
  B, T, H, C = q_lat_BxTxHxC.shape
  S, CR = ckr_BxSxCR.shape[1:]
  dt, f32 = q_lat_BxTxHxC.dtype, jnp.float32
  Q = min(chunk, T)
  n = -(-T // Q)
  delta_BxTxH = jnp.sum(g_BxTxHxC.astype(f32) * o_BxTxHxC.astype(f32), -1)

  def split(a):
    a = jnp.pad(a, [(0, 0), (0, n * Q - T)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(B, n, Q, *a.shape[2:]), 1, 0)

  def step(dckr_BxSxCR, xs):
    q_lat, q_rope, idx, valid, lse, g, delta = xs
    sel_BxQxKxCR = _gather_rows(ckr_BxSxCR, idx)
    logits = _logits(q_lat, q_rope, sel_BxQxKxCR, C, scale)
    p_BxQxHxK = jnp.where(valid[:, :, None], jnp.exp(logits - lse[..., None]), 0.0)
    dp = jnp.einsum("bqhc,bqkc->bqhk", g, sel_BxQxKxCR[..., :C], preferred_element_type=f32)
    ds = (p_BxQxHxK * (dp - delta[..., None]) * scale).astype(dt)
    dq_lat = jnp.einsum("bqhk,bqkc->bqhc", ds, sel_BxQxKxCR[..., :C])
    dq_rope = jnp.einsum("bqhk,bqkr->bqhr", ds, sel_BxQxKxCR[..., C:])
    q_cat = jnp.concatenate([q_lat, q_rope.astype(dt)], -1)
    dsel_BxQxKxCR = jnp.einsum("bqhk,bqhx->bqkx", ds, q_cat, preferred_element_type=f32)
    dsel_BxQxKxCR = dsel_BxQxKxCR.at[..., :C].add(jnp.einsum(
        "bqhk,bqhc->bqkc", p_BxQxHxK.astype(dt), g, preferred_element_type=f32))
    dckr_BxSxCR = jax.vmap(lambda d, i, v: d.at[i.reshape(-1)].add(v.reshape(-1, CR)))(
        dckr_BxSxCR, idx, dsel_BxQxKxCR)
    return dckr_BxSxCR, (dq_lat, dq_rope)

  dckr, dq = jax.lax.scan(step, jnp.zeros((B, S, CR), f32), tuple(map(split, (
      q_lat_BxTxHxC, q_rope_BxTxHxR, idx_BxTxK, valid_BxTxK, lse_BxTxH,
      g_BxTxHxC.astype(dt), delta_BxTxH))))
  dq_lat, dq_rope = (jnp.moveaxis(a, 0, 1).reshape(B, n * Q, *a.shape[3:])[:, :T] for a in dq)
  return dq_lat, dq_rope.astype(q_rope_BxTxHxR.dtype), dckr.astype(ckr_BxSxCR.dtype)


def dense_mask_mla(q_lat_BxTxHxC, q_rope_BxTxHxR, c_BxSxC, k_rope_BxSxR, idx_BxTxK,
                   valid_BxTxK, *, scale: float) -> jax.Array:
  """The reference for `sparse_mla`: every key scored, the unselected ones masked. Tests
  only (it costs the dense attention and more)."""
  B, T = idx_BxTxK.shape[:2]
  S = c_BxSxC.shape[1]
  sel_BxTxS = jnp.zeros((B, T, S), bool).at[
      jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], idx_BxTxK].max(valid_BxTxK)
  logits = (jnp.einsum("bthc,bsc->bths", q_lat_BxTxHxC, c_BxSxC,
                       preferred_element_type=jnp.float32)
            + jnp.einsum("bthr,bsr->bths", q_rope_BxTxHxR, k_rope_BxSxR,
                         preferred_element_type=jnp.float32)) * scale
  p = jax.nn.softmax(jnp.where(sel_BxTxS[:, :, None, :], logits, -jnp.inf), axis=-1)
  return jnp.einsum("bths,bsc->bthc", p.astype(c_BxSxC.dtype), c_BxSxC)


# ----------------------------------------------------------------------------- a layer's stage


def _batch_shard_mesh(B: int):
  """The mesh to run a layer's sparse stage per batch shard on (`jax.shard_map`), or None:
  under a mesh of several devices whose axes of size > 1 are all batch axes
  (`sharding.BATCH_AXES`: the batch split over every device, as `sharding.batch_sharding`
  splits it) and divide B. Not inside a shard_map already; not with a tensor axis (the
  kernels want a query's heads on one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return None
  if any(mesh.shape[a] > 1 for a in mesh.axis_names if a not in BATCH_AXES):
    return None
  if any(a not in mesh.axis_names for a in BATCH_AXES):
    return None
  return mesh if B % math.prod(mesh.shape[a] for a in BATCH_AXES) == 0 else None


def _kernels_run_here() -> bool:
  """Whether the GPU kernels can take this trace's arrays as whole: no mesh of several
  devices, or inside a shard_map over all of its axes of size > 1 (XLA cannot partition
  their custom calls)."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or all(mesh.shape[a] == 1 or a in mesh.manual_axes
                           for a in mesh.axis_names)


def sparse_stage(q_lat_BxTxHxC, q_rope_BxTxHxR, c_BxSxC, k_rope_BxSxR, q_BxTxJxI, w_BxTxJ,
                 k_BxSxI, segment_ids_BxT=None, *, topk: int, chunk: int, method: str,
                 impl: str, scale: float):
  """A layer's sparse-stage attention: `select_topk`, `sparse_mla` over the selection and
  `sparse_indexer_kl` -> (o_lat [B,T,H,C], the KL per query [B,T]).

  Under a mesh of several devices that split the batch only (`_batch_shard_mesh`), it runs
  per batch shard in a `jax.shard_map` over the whole mesh: every device its own rows, no
  communication (the selection and attention of a row are the row's), and the GPU kernels
  (impl / method "auto" / "fused") run there as on one device, where under plain `jit`
  XLA would have to partition their custom calls (it cannot: "auto" takes the pure-JAX
  paths outside). Other meshes (a tensor axis, a batch the devices do not divide): as
  before, XLA partitions the pure-JAX paths."""
  B = q_lat_BxTxHxC.shape[0]

  def stage(q_lat, q_rope, c, k_rope, q_I, w, k_I, seg):
    idx, valid, score = select_topk(q_I, w, k_I, topk=topk, chunk=chunk, segment_ids_BxT=seg,
                                    method=method)
    o_lat, p = sparse_mla(q_lat, q_rope, c, k_rope, idx, valid, scale=scale, chunk=chunk,
                          impl=impl)
    return o_lat, sparse_indexer_kl(p, score, valid)

  args = (q_lat_BxTxHxC, q_rope_BxTxHxR, c_BxSxC, k_rope_BxSxR, q_BxTxJxI, w_BxTxJ, k_BxSxI)
  mesh = _batch_shard_mesh(B)
  if mesh is None:
    return stage(*args, segment_ids_BxT)
  rows = jax.sharding.PartitionSpec(BATCH_AXES)
  if segment_ids_BxT is None:  # (no segments: not the same as one segment of zeros)
    body = lambda *a: stage(*a, None)  # noqa: E731
  else:
    body, args = stage, args + (segment_ids_BxT,)
  return jax.shard_map(body, mesh=mesh, in_specs=(rows,) * len(args), out_specs=(rows, rows),
                       check_vma=False)(*args)


# ----------------------------------------------------------------------------- KL losses


def _kl(p, log_q, ok):
  """sum over allowed keys of p (log p - log q), per query."""
  terms = jnp.where(ok & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0)
  return terms.sum(-1)


def dense_indexer_kl(q_lat_BxTxHxC, q_rope_BxTxHxR, c_BxSxC, k_rope_BxSxR, q_BxTxJxI,
                     w_BxTxJ, k_BxSxI, *, scale: float, chunk: int,
                     segment_ids_BxT: jax.Array | None = None) -> jax.Array:
  """Dense warm-up: KL(p[t, :] || softmax(I[t, :])) per query [B, T], p the main attention's
  probabilities summed over heads and L1-normalised (stop-gradient), over allowed keys."""
  B, T, H = q_lat_BxTxHxC.shape[:3]
  S = c_BxSxC.shape[1]
  sg = jax.lax.stop_gradient
  c_BxSxC, k_rope_BxSxR = sg(c_BxSxC), sg(k_rope_BxSxR)
  seg = segment_ids_BxT if segment_ids_BxT is not None else jnp.zeros((B, T), jnp.int32)

  def chunk_fn(t0, q_lat, q_rope, q_I, w, seg_BxQ):
    Q = q_lat.shape[1]
    ok = _allowed(t0, Q, jnp.arange(S, dtype=jnp.int32), seg_BxQ, segment_ids_BxT)
    logits = (jnp.einsum("bqhc,bsc->bqhs", sg(q_lat), c_BxSxC, preferred_element_type=jnp.float32)
              + jnp.einsum("bqhr,bsr->bqhs", sg(q_rope), k_rope_BxSxR,
                           preferred_element_type=jnp.float32)) * scale
    p = _masked_softmax(logits, ok[:, :, None, :]).sum(2) / H
    log_q = jax.nn.log_softmax(jnp.where(ok, index_scores(q_I, w, k_BxSxI), _MASKED), -1)
    return _kl(p, log_q, ok)

  return over_query_chunks(chunk_fn, chunk, T, q_lat_BxTxHxC, q_rope_BxTxHxR, q_BxTxJxI,
                           w_BxTxJ, seg)


def sparse_indexer_kl(p_BxTxK, score_BxTxK, valid_BxTxK) -> jax.Array:
  """Sparse stage: KL(p[t, S_t] || softmax(I[t, S_t])) per query [B, T], over the selected
  set S_t (p from `sparse_mla`, already stop-gradient and normalised over S_t)."""
  with jax.named_scope("dsa_indexer_kl"):
    log_q = jax.nn.log_softmax(jnp.where(valid_BxTxK, score_BxTxK, _MASKED), -1)
    return _kl(jax.lax.stop_gradient(p_BxTxK), log_q, valid_BxTxK)
