"""DSA's lightning indexer on the GPU: its scores and the threshold top-k's candidates in
one kernel, the top-k's row selects, the selected keys' scores (Pallas, Triton backend).

    pos_BxNxC, key_BxNxC, count_BxN = threshold_candidates(
        q_BxJxNxI, w_BxJxN, k_BxSxI, tau_BxN, t0, extent=S, cap=C)
    tau_N = kth_largest(key_NxM, k)                      # the sample's threshold
    idx_NxK = top_positions(key_NxM, k, pos_NxM)         # the k best of the candidates
    score_BxTxK = selected_scores(q_BxTxJxI, w_BxTxJ, k_BxSxI, idx_BxTxK)  # differentiable

For DSA's top-k (`mohge_jax.sparse_attention.select_topk(method="fused")`): query n (at
position t0 + n) scores key s as I[n, s] = sum_j w[j, n] ReLU(q[j, n] . k[s]) (float32),
for the keys it may see (s <= t0 + n, s < extent, the same segment when segment ids are
given; a zero score as +0.0, as `sparse_attention.index_scores`); the keys whose score's
order key (`sparse_attention._order_key`: float32 bits in `jax.lax.top_k`'s total order,
as uint32) is >= tau[n] are the row's candidates. Returns their positions in rising order
in [cap] slots (pos; key: their order keys), the slots past the count holding 0, and the
counts (all candidates, also past cap).

Why a kernel: in XLA the threshold top-k writes each query chunk's [Q, S] float32 scores
and reads them back in ~30 launches (the order keys, the candidates' running count, their
scatter into the buffer, selects): at 128k tokens ~414 ms of DSA's 1.34 s fwd+bwd on the
H200, where the scores are ~4.4 TFLOP of bf16 products and the candidates ~4k a row
(benchmarks/notes_dsa.md, twentieth session). Here the scores never leave the chip: two
passes over the (query block, key segment) grid compute them on the tensor cores, the
first counts each segment's candidates a row, the second (after an exclusive prefix sum
over segments, in XLA) writes them at their slots by a running count (`cumsum` along the
block's keys). The products are computed twice; nothing of size Q x S is written.

Why Pallas's Triton backend, deprecated in JAX 0.11 in favour of Mosaic GPU: the second
pass is a stream compaction (a prefix sum along a row, stores to computed addresses), and
Mosaic GPU's Pallas lowering has neither a cumsum nor per-element scattered stores
(jax 0.11.2); Triton has both. The pure-JAX references (`reference`,
`sparse_attention._kth_key` / `_top_positions`, `selected_scores_reference`) are the same
definitions in XLA and the path on other platforms; the kernels run in the Pallas
interpreter on CPU for the tests. The row selects and the selected scores are described
where they are defined, below.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK_Q = 64      # queries a program (the products' M)
BLOCK_K = 64      # keys a step
SEGMENT = 1024    # keys a program (the grid's third axis)
MAX_ROW = 16384   # the row selects' longest row (kept in registers: 64 KB a program)
_SIGN = -(2 ** 31)  # int32 0x80000000: signed key <-> uint32 order key


def unsupported_reason(index_dim: int) -> str | None:
  """Why the kernels cannot take this indexer (None when they can): Triton's blocks are
  powers of two and its products need a contraction of at least 16."""
  if index_dim < 16 or index_dim & (index_dim - 1):
    return f"the indexer kernels need an index dim that is a power of two >= 16, got {index_dim}"
  return None


def _signed_key(x):
  """float32 -> int32 in `_order_key`'s order, as a signed integer (order key ^ 2^31)."""
  bits = lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kernel(t0_ref, q_ref, w_ref, k_ref, tau_ref, *rest, J: int, extent: int, cap: int,
            segments: bool, write: bool):
  if segments:
    segq_ref, segk_ref, *rest = rest
  if write:
    base_ref, pos_ref, key_ref = rest
  else:
    (count_ref,) = rest
  b, qb, sg = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(qb * BLOCK_Q, BLOCK_Q)
  t_Q = t0_ref[0] + qb * BLOCK_Q + lax.iota(jnp.int32, BLOCK_Q)
  s_lo = sg * SEGMENT
  s_end = jnp.minimum(jnp.minimum(s_lo + SEGMENT, extent), t0_ref[0] + (qb + 1) * BLOCK_Q)
  steps = jnp.maximum(0, (s_end - s_lo + BLOCK_K - 1) // BLOCK_K)
  q_J = [q_ref[b, j, rows, :] for j in range(J)]
  w_J = [w_ref[b, j, rows] for j in range(J)]
  tau_Q = tau_ref[b, rows]
  seg_Q = segq_ref[b, rows] if segments else None
  n_Q = qb * BLOCK_Q + lax.iota(jnp.int32, BLOCK_Q)

  def step(i, base_Q):
    s0 = s_lo + i * BLOCK_K
    k_KxI = k_ref[b, pl.ds(s0, BLOCK_K), :]
    score = jnp.zeros((BLOCK_Q, BLOCK_K), jnp.float32)
    for q_QxI, w in zip(q_J, w_J):
      dots = lax.dot_general(q_QxI, k_KxI, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
      score = score + w[:, None] * jnp.maximum(dots, 0.0)
    s_K = s0 + lax.iota(jnp.int32, BLOCK_K)
    take = (s_K[None, :] <= t_Q[:, None]) & (s_K[None, :] < extent)
    if segments:
      take = take & (segk_ref[b, pl.ds(s0, BLOCK_K)][None, :] == seg_Q[:, None])
    key = _signed_key(jnp.where(score == 0.0, 0.0, score))  # -0.0 as +0.0, as index_scores
    take = take & (key >= tau_Q[:, None])
    take_i = take.astype(jnp.int32)
    if write:
      slot = base_Q[:, None] + jnp.cumsum(take_i, axis=1) - 1
      ok = take & (slot < cap)
      # Masked lanes store nothing on the GPU; the interpreter's masked store writes the
      # old value back at their index, so they get distinct spill columns past cap.
      slot = jnp.where(ok, slot, cap + lax.broadcasted_iota(jnp.int32, slot.shape, 1))
      n_QxK = jnp.broadcast_to(n_Q[:, None], slot.shape)
      plt.store(pos_ref.at[b, n_QxK, slot], jnp.broadcast_to(s_K[None, :], slot.shape),
                mask=ok)
      plt.store(key_ref.at[b, n_QxK, slot], key, mask=ok)
    return base_Q + jnp.sum(take_i, axis=1)

  start = base_ref[b, sg, rows] if write else jnp.zeros((BLOCK_Q,), jnp.int32)
  count = lax.fori_loop(0, steps, step, start)
  if not write:
    count_ref[b, sg, rows] = count


@functools.partial(jax.jit, static_argnames=("extent", "cap", "interpret"))
def threshold_candidates(q_BxJxNxI, w_BxJxN, k_BxSxI, tau_BxN, t0, seg_q_BxN=None,
                         seg_k_BxS=None, *, extent: int, cap: int, interpret: bool = False):
  """See the module docstring. q, k: bf16 (or float32); w: float32; tau: uint32 order
  keys; t0: the first query's position (int, may be traced). Returns pos [B, N, cap] int32,
  key [B, N, cap] uint32, count [B, N] int32. N is padded to a multiple of 64 and S to one
  of 64 internally."""
  B, J, N, I = q_BxJxNxI.shape
  S = k_BxSxI.shape[1]
  if not 0 < extent <= S:
    raise ValueError(f"extent={extent}: must be between 1 and the keys' length {S}")
  if (seg_q_BxN is None) != (seg_k_BxS is None):
    raise ValueError("segment ids: give both the queries' and the keys' or neither")
  if reason := unsupported_reason(I):
    raise ValueError(reason)
  Np = -(-N // BLOCK_Q) * BLOCK_Q
  Sp = -(-S // BLOCK_K) * BLOCK_K
  pad_n = lambda a, axis: jnp.pad(a, [(0, Np - N if d == axis else 0) for d in range(a.ndim)])
  q = pad_n(q_BxJxNxI, 2)
  w = pad_n(w_BxJxN.astype(jnp.float32), 2)
  tau = pad_n(lax.bitcast_convert_type(tau_BxN.astype(jnp.uint32) ^ jnp.uint32(1 << 31),
                                       jnp.int32), 1)
  k = jnp.pad(k_BxSxI, [(0, 0), (0, Sp - S), (0, 0)])
  segments = seg_q_BxN is not None
  seg_args = ((pad_n(seg_q_BxN.astype(jnp.int32), 1),
               jnp.pad(seg_k_BxS.astype(jnp.int32), [(0, 0), (0, Sp - S)]))
              if segments else ())
  t0_1 = jnp.asarray(t0, jnp.int32).reshape(1)
  G = -(-extent // SEGMENT)
  grid = (B, Np // BLOCK_Q, G)
  params = plt.CompilerParams(num_warps=4, num_stages=2)
  common = dict(J=J, extent=extent, cap=cap, segments=segments)
  args = (t0_1, q, w, k, tau, *seg_args)
  counts_BxGxN = pl.pallas_call(
      functools.partial(_kernel, write=False, **common), grid=grid,
      out_shape=jax.ShapeDtypeStruct((B, G, Np), jnp.int32),
      compiler_params=params, interpret=interpret, name="dsa_index_count")(*args)
  base_BxGxN = jnp.cumsum(counts_BxGxN, axis=1) - counts_BxGxN
  pos, key = pl.pallas_call(
      functools.partial(_kernel, write=True, **common), grid=grid,
      out_shape=(jax.ShapeDtypeStruct((B, Np, cap + BLOCK_K), jnp.int32),
                 jax.ShapeDtypeStruct((B, Np, cap + BLOCK_K), jnp.int32)),
      compiler_params=params, interpret=interpret, name="dsa_index_candidates")(
          *args, base_BxGxN)
  count_BxN = jnp.sum(counts_BxGxN, axis=1)[:, :N]
  filled = jnp.arange(cap)[None, None, :] < count_BxN[:, :, None]
  pos = jnp.where(filled, pos[:, :N, :cap], 0)
  key = jnp.where(filled, lax.bitcast_convert_type(key[:, :N, :cap], jnp.uint32) ^ jnp.uint32(1 << 31),
                  jnp.uint32(0))
  return pos, key, count_BxN


def reference(q_BxJxNxI, w_BxJxN, k_BxSxI, tau_BxN, t0, seg_q_BxN=None, seg_k_BxS=None, *,
              extent: int, cap: int):
  """`threshold_candidates` from the XLA path's own pieces (`sparse_attention`'s index
  scores, causal and segment mask, order keys and compaction): the [B, N, extent] scores,
  a running count and a scatter."""
  from mohge_jax import sparse_attention as dsa  # noqa: PLC0415 - the library's definitions

  B, J, N, I = q_BxJxNxI.shape
  score_BxNxS = dsa.index_scores(jnp.swapaxes(q_BxJxNxI, 1, 2), jnp.swapaxes(w_BxJxN, 1, 2),
                                 k_BxSxI[:, :extent])
  key_BxNxS = dsa._order_key(score_BxNxS)
  take = dsa._allowed(t0, N, jnp.arange(extent, dtype=jnp.int32), seg_q_BxN,
                      None if seg_k_BxS is None else seg_k_BxS[:, :extent])
  take = take & (key_BxNxS >= tau_BxN[:, :, None].astype(jnp.uint32))
  pos, count = dsa._compact(take.reshape(B * N, extent), cap)
  filled = jnp.arange(cap)[None, :] < count[:, None]
  keys = jnp.where(filled, jnp.take_along_axis(key_BxNxS.reshape(B * N, extent), pos, 1), 0)
  return pos.reshape(B, N, cap), keys.astype(jnp.uint32).reshape(B, N, cap), count.reshape(B, N)


# ----------------------------------------------------------------------------- row selects


def _select_kernel(key_ref, *rest, k: int, positions: bool, given_pos: bool):
  """One row a program, the row's M keys in registers: the k-th largest key by a 32-step
  binary search on its bits (count >= candidate, a block reduction each step), then with
  `positions` the row's k largest entries' positions, rising (ties to lower positions)."""
  if given_pos:
    pos_ref, *rest = rest
  out_ref = rest[0]
  row = pl.program_id(0)
  key_M = key_ref[row, :]  # signed keys (order key ^ 2^31)

  def bit(i, prefix):  # prefix: the unsigned order key's bits found so far
    cand = prefix | (jnp.int32(1) << (31 - i))
    count = jnp.sum((key_M >= (cand ^ _SIGN)).astype(jnp.int32))
    return jnp.where(count >= k, cand, prefix)

  kth = lax.fori_loop(0, 32, bit, jnp.int32(0)) ^ _SIGN
  if not positions:
    out_ref[row] = kth
    return
  above, tie = key_M > kth, key_M == kth
  room = k - jnp.sum(above.astype(jnp.int32))
  take = above | (tie & (jnp.cumsum(tie.astype(jnp.int32)) <= room))
  slot = jnp.cumsum(take.astype(jnp.int32)) - 1
  slot = jnp.where(take, slot, k)  # the interpreter writes masked lanes: one spill column
  pos_M = pos_ref[row, :] if given_pos else lax.iota(jnp.int32, key_M.shape[0])
  plt.store(out_ref.at[row, slot], pos_M, mask=take)


def _rows_select(key_NxM, k: int, pos_NxM, positions: bool, interpret: bool):
  N, M = key_NxM.shape
  if not 0 < k <= M <= MAX_ROW:
    raise ValueError(f"k={k}, rows of {M}: must be 0 < k <= M <= {MAX_ROW}")
  Mp = max(16, 1 << (M - 1).bit_length())  # a power of two: padded with the lowest key
  skey = lax.bitcast_convert_type(key_NxM.astype(jnp.uint32) ^ jnp.uint32(1 << 31), jnp.int32)
  skey = jnp.pad(skey, [(0, 0), (0, Mp - M)], constant_values=_SIGN)
  args = [skey]
  if pos_NxM is not None:
    args.append(jnp.pad(pos_NxM.astype(jnp.int32), [(0, 0), (0, Mp - M)]))
  out = (jax.ShapeDtypeStruct((N, k + 1), jnp.int32) if positions
         else jax.ShapeDtypeStruct((N,), jnp.int32))
  got = pl.pallas_call(
      functools.partial(_select_kernel, k=k, positions=positions,
                        given_pos=pos_NxM is not None),
      grid=(N,), out_shape=out, interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=8 if Mp >= 8192 else 4, num_stages=1),
      name="dsa_topk_rows" if positions else "dsa_kth_rows")(*args)
  if positions:
    return got[:, :k]
  return lax.bitcast_convert_type(got, jnp.uint32) ^ jnp.uint32(1 << 31)


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def kth_largest(key_NxM, k: int, *, interpret: bool = False):
  """Each row's k-th largest uint32 key [N] (`sparse_attention._kth_key`), a program a row.
  Rows are padded to a power of two with key 0; M up to MAX_ROW (a row lives in registers)."""
  return _rows_select(key_NxM, k, None, False, interpret)


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def top_positions(key_NxM, k: int, pos_NxM=None, *, interpret: bool = False):
  """Each row's k largest uint32 keys' positions [N, k] int32, rising, ties to the lower
  positions (`sparse_attention._top_positions`); with pos_NxM, pos at those positions
  (the candidates' own positions in the sequence)."""
  return _rows_select(key_NxM, k, pos_NxM, True, interpret)


# ----------------------------------------------------------------------------- relaxed adds
#
# `plt.atomic_add` lowers to Triton atomics with acquire-release ordering (jax 0.11.2's
# `triton.lowering._atomic_rmw` default; the public call takes no `sem`): each add orders
# the program's memory operations around it, where a sum needs only the add to be atomic
# (Triton's own `tl.atomic_add(sem="relaxed")`). The selected scores' backward adds T x K x I
# floats (8.6e9 at 64k tokens, K = 2048, I = 64), 54 ms of DSA's 371 at 64k on the H200
# (twenty-first session's profile) with the ordered adds. This primitive is that add
# with relaxed ordering; its interpreter rule (discharge) and abstract evaluation are
# atomic_rmw's. The selected scores forward+backward alone: 28.5 ms against 59.9 at 64k,
# 57.8 against 121.4 at 128k (XLA's gather and scatter-add: 119.4, 213.2).

def _make_relaxed_add():
  from jax._src import core as jax_core
  from jax._src import tree_util
  from jax._src.lib.triton import dialect as tt_dialect
  from jax._src.pallas.triton import lowering as tl
  from jax._src.pallas.triton import primitives as tp
  from jax._src.state import discharge as state_discharge
  from jax._src.state import indexing
  from jax._src.state import primitives as state_primitives

  add = tp.AtomicOpType.ADD
  prim = jax_core.Primitive("dsa_relaxed_atomic_add")
  prim.def_effectful_abstract_eval(
      lambda *avals, args_tree: tp._atomic_abstract_eval(*avals, args_tree=args_tree,
                                                         atomic_type=add))
  state_discharge.register_discharge_rule(prim)(
      lambda ctx, *args, args_tree: tp._atomic_rmw_discharge_rule(
          ctx, *args, args_tree=args_tree, atomic_type=add))

  @tl.register_lowering(prim)
  def _lowering(ctx, *args_flat, args_tree):
    block_info, *_ = ctx.block_infos
    ptr, indexers, val, mask = args_tree.unflatten(args_flat)
    *_, value_aval, _ = args_tree.unflatten(ctx.avals_in)
    (idx,) = indexers
    if not isinstance(idx, indexing.NDIndexer) or mask is not None:
      raise NotImplementedError("relaxed_atomic_add: one indexer, no mask")
    ptr = tl._compute_pointers_from_indices(ptr, block_info, idx)
    val = tl._ensure_ir_value(val, value_aval)
    return tl._atomic_rmw(tt_dialect.RMWOp.FADD, ptr, val,
                          semantic=tt_dialect.MemSemantic.RELAXED)

  def relaxed_add(ref, idx, val):
    """ref[idx] += val (float32), atomic per element, unordered."""
    if ref.dtype != jnp.float32:
      raise TypeError(f"relaxed_atomic_add: float32 refs only, got {ref.dtype}")
    x_ref, transforms = state_primitives.get_ref_and_transforms(ref, idx, "relaxed_add")
    args_flat, args_tree = tree_util.tree_flatten((x_ref, transforms, val, None))
    return prim.bind(*args_flat, args_tree=args_tree)
  return relaxed_add


relaxed_atomic_add = _make_relaxed_add()


# ----------------------------------------------------------------------------- selected scores


def _scores_kernel(q_ref, w_ref, k_ref, idx_ref, *rest, J: int, K: int, BK: int, S: int,
                   backward: bool, relaxed: bool = True):
  """One query a program, its K selected keys BK at a time: each key's index row gathered
  (one load of I numbers a key), its J head products on the CUDA cores (I is small), the
  score; backward: dq and dw summed in registers, each key's gradient added into dk by
  float32 atomics (relaxed: unordered, `relaxed_atomic_add`; else `plt.atomic_add`'s
  acquire-release ones)."""
  if backward:
    g_ref, _, dq_ref, dw_ref, dk_ref = rest
  else:
    (s_ref,) = rest
  b, t = pl.program_id(0), pl.program_id(1)
  I = q_ref.shape[-1]
  q_J = [q_ref[b, t, j, :].astype(jnp.float32) for j in range(J)]
  w_J = [w_ref[b, t, j] for j in range(J)]
  col_I = lax.iota(jnp.int32, I)

  def step(i, carry):
    row = jnp.clip(idx_ref[b, t, pl.ds(i * BK, BK)], 0, S - 1)
    k_KxI = k_ref[b, row[:, None], col_I[None, :]].astype(jnp.float32)
    dots = [jnp.sum(k_KxI * q[None, :], axis=1) for q in q_J]
    if not backward:
      score = sum(w * jnp.maximum(d, 0.0) for w, d in zip(w_J, dots))
      s_ref[b, t, pl.ds(i * BK, BK)] = score
      return carry
    dq_J, dw_J = carry
    g = g_ref[b, t, pl.ds(i * BK, BK)]
    coef = [jnp.where(d > 0, g * w, 0.0) for w, d in zip(w_J, dots)]
    dw_J = [dw + jnp.sum(g * jnp.maximum(d, 0.0)) for dw, d in zip(dw_J, dots)]
    dq_J = [dq + jnp.sum(c[:, None] * k_KxI, axis=0) for dq, c in zip(dq_J, coef)]
    dk_KxI = sum(c[:, None] * q[None, :] for c, q in zip(coef, q_J))
    # (no mask: BK divides K; the interpreter's atomics take none, and its add of a
    # block's rows assumes them distinct, as a query's selected keys are)
    if relaxed:
      relaxed_atomic_add(dk_ref, (b, row[:, None], col_I[None, :]), dk_KxI)
    else:
      plt.atomic_add(dk_ref, (b, row[:, None], col_I[None, :]), dk_KxI)
    return dq_J, dw_J

  steps = K // BK
  if not backward:
    lax.fori_loop(0, steps, step, 0)
    return
  zero_I, zero = jnp.zeros((I,), jnp.float32), jnp.float32(0.0)
  dq_J, dw_J = lax.fori_loop(0, steps, step, ([zero_I] * J, [zero] * J))
  for j in range(J):
    dq_ref[b, t, j, :] = dq_J[j]
    dw_ref[b, t, j] = dw_J[j]


def _scores_call(q, w, k, idx, g, *, interpret: bool, relaxed: bool = True):
  B, T, J, I = q.shape
  S, K = k.shape[1], idx.shape[-1]
  BK = math.gcd(K, 128)  # a power of two that divides K (K = 2048: 128)
  idx = idx.astype(jnp.int32)
  kw = dict(J=J, K=K, BK=BK, S=S, backward=g is not None, relaxed=relaxed)
  params = plt.CompilerParams(num_warps=4, num_stages=2)
  if g is None:
    return pl.pallas_call(
        functools.partial(_scores_kernel, **kw), grid=(B, T),
        out_shape=jax.ShapeDtypeStruct((B, T, K), jnp.float32), compiler_params=params,
        interpret=interpret, name="dsa_selected_scores")(q, w, k, idx)
  g = g.astype(jnp.float32)
  dq, dw, dk = pl.pallas_call(
      functools.partial(_scores_kernel, **kw), grid=(B, T),
      out_shape=(jax.ShapeDtypeStruct((B, T, J, I), jnp.float32),
                 jax.ShapeDtypeStruct((B, T, J), jnp.float32),
                 jax.ShapeDtypeStruct((B, S, I), jnp.float32)),
      input_output_aliases={5: 2}, compiler_params=params, interpret=interpret,
      name="dsa_selected_scores_bwd")(q, w, k, idx, g, jnp.zeros((B, S, I), jnp.float32))
  return dq, dw, dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _selected_scores(q, w, k, idx, interpret, relaxed):
  return _scores_call(q, w, k, idx, None, interpret=interpret)


def _selected_scores_fwd(q, w, k, idx, interpret, relaxed):
  return _scores_call(q, w, k, idx, None, interpret=interpret), (q, w, k, idx)


def _selected_scores_bwd(interpret, relaxed, res, g):
  q, w, k, idx = res
  dq, dw, dk = _scores_call(q, w, k, idx, g, interpret=interpret, relaxed=relaxed)
  return dq.astype(q.dtype), dw.astype(w.dtype), dk.astype(k.dtype), None


_selected_scores.defvjp(_selected_scores_fwd, _selected_scores_bwd)


def selected_scores(q_BxTxJxI, w_BxTxJ, k_BxSxI, idx_BxTxK, *, interpret: bool = False,
                    _ordered_adds: bool = False):
  """The index scores of each query's selected keys, I[t, idx[t, k]] [B, T, K] float32
  (`sparse_attention.select_topk`'s differentiable scores), differentiable in q, w and k:
  a program a query gathers its keys' index rows itself (nothing of size [T, K, I] is
  written), and the backward adds each key's gradient into dk by float32 atomics (in an
  order that varies from run to run) where XLA's scatter-add of [T, K, I] took 144 ms at
  128k on the H200 (ninth session). I a power of two >= 16; each query's K keys distinct
  (a top-k's); the keys go BK = gcd(K, 128) a step. The adds are unordered
  (`relaxed_atomic_add`; _ordered_adds: `plt.atomic_add`'s acquire-release ones, for
  benchmarks/dsa.py)."""
  if reason := unsupported_reason(q_BxTxJxI.shape[-1]):
    raise ValueError(f"selected_scores: {reason}")
  return _selected_scores(q_BxTxJxI, w_BxTxJ, k_BxSxI, idx_BxTxK, interpret,
                          not _ordered_adds)


def selected_scores_reference(q_BxTxJxI, w_BxTxJ, k_BxSxI, idx_BxTxK):
  """`selected_scores` in XLA: the keys' rows gathered, [B, T, K, I]."""
  k_BxTxKxI = jax.vmap(lambda k, i: k[i])(k_BxSxI, idx_BxTxK)
  dots = jnp.einsum("btji,btki->btjk", q_BxTxJxI, k_BxTxKxI, preferred_element_type=jnp.float32)
  return jnp.einsum("btjk,btj->btk", jnp.maximum(dots, 0.0), w_BxTxJ.astype(jnp.float32))
