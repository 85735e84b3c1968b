"""DSA sparse MLA attention in latent form, forward and backward, as Mosaic GPU kernels on
the warp-level 16-row MMA: right on the H200 against the pure-JAX reference, and what
`dsa_impl: auto` runs on one Hopper GPU ("pallas_mma_bwd"). The forward first:

    o_lat, lse = sparse_mla_fwd(q_lat [B,T,H,C], q_rope [B,T,H,R], ckr [B,S,C+R], idx [B,T,K])

The same contract as `sparse_mla_gpu.sparse_mla_fwd` (the wgmma kernel): score[t, h, k] =
scale · (q_lat[t, h] · c[idx[t, k]] + q_rope[t, h] · k_rope[idx[t, k]]), softmax over the k
with idx ≥ 0 (invalid keys at -1e30, so a query with none gets the uniform average of its
sequence's row 0), o_lat[t, h] = Σ_k p c[idx[t, k]], lse[t, h] (natural log, float32).

Why another kernel: the wgmma kernel runs at ~14 TFLOP/s on the H200 (notes_dsa.md): its
gather is 192 one-row TMA copies a step issued by one thread, its 16 heads are padded to
wgmma's 64 rows, and it computes the scores twice (once per half of C). Here:
- the query's 16 heads are the M dimension of `plgpu.mma` (mma.sync, 16-row accumulator
  tiles with m_warps=1): nothing padded, the scores computed once, O [16, C] f32 is 64
  registers a thread (the decode kernel's form, `mla_decode_gpu.py`, right on the H200);
- the gather is loads by the whole warpgroup: per selected key its latent row [C] (each
  thread C/128 contiguous elements) and the 128 columns ending at the row's end (the
  rope key is its last R; the rest re-reads latent bytes already in L1/L2, since a
  strided 1-D load needs 128 x 2^n elements and C + R = 576 is not), GROUP keys' loads
  issued before their stores to SMEM, so many rows are in flight a thread;
- one CTA per query (queries in sequence order: neighbours' selections overlap in L2),
  ~90 KB of SMEM so two CTAs share an SM and one's gather overlaps the other's MMAs;
- Pallas' automatic barriers around every SMEM store (two a stored row: 130 a step) are
  off (`unsafe_no_auto_barriers`); `plgpu.commit_smem()` (a warpgroup barrier) is placed
  where threads hand SMEM to each other: after the step's rows are stored, after P is
  stored, and before the next step overwrites what this one read.
Bank conflicts: an MMA operand fragment is read by each warp as 8 rows x 16 bytes (scores'
B operand, P) or 4 rows x 16 bytes (P x latent's B operand). Rows of 512, 128 or 64 bf16
are a multiple of 128 bytes apart, so those rows fall on the same 4 of SMEM's 32 banks and
a load is replayed 4-8 times (the first H200 run: ~14 us a 64-key step, about what 8-way
replays of its ~550 loads a thread predict). Each SMEM row is padded by ROW_PAD = 8 bf16
(16 bytes): row r starts 4r banks further, and 8 rows cover all 32.
Scores: C/64 + R/64 MMAs of K = 64 over the key tile read transposed from SMEM; online
softmax along the keys (rows are heads); P through SMEM as the A operand of P x latent.
The backward kernel is below (`sparse_mla_bwd`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_decode_gpu import mma

HEADS = 16      # the MMA's M
KEYS = 64       # keys a step
CHUNK = 64      # contraction columns an MMA (scores)
OUT_COLS = 128  # output columns an accumulator (P x latent)
TAIL = 128      # columns loaded from the end of a row (holds the rope key)
GROUP = 16      # keys whose loads are issued before their stores
ROW_PAD = 8     # bf16 columns after each SMEM row (16 bytes): see "Bank conflicts" above
_MASKED = -1e30  # as sparse_attention._MASKED (in the kernel's base-2 scaled units)


def unsupported_reason(H: int, C: int, R: int, K: int, dtype) -> str | None:
  """Why these shapes cannot run (None when they can)."""
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return f"sparse_mla mma kernel: dtype must be bfloat16, got {jnp.dtype(dtype).name}"
  if H != HEADS:
    return f"sparse_mla mma kernel: heads must be {HEADS} (the MMA's M), got {H}"
  if C % OUT_COLS or C // 128 not in (1, 2, 4, 8):
    return f"sparse_mla mma kernel: latent dim must be 128, 256, 512 or 1024, got {C}"
  if R % CHUNK or R > TAIL:
    return f"sparse_mla mma kernel: rope dim must be {CHUNK} or {TAIL}, got {R}"
  if not 1 <= K <= 256 * KEYS:  # the idx row is one TMA box [K / 64, 64]
    return f"sparse_mla mma kernel: selected keys K must be 1..{256 * KEYS}, got {K}"
  return None


def _checked_shapes(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK):
  """(B, T, H, C, R, C+R, K, dtype), or the error that names what the kernels cannot take."""
  B, T, H, C = q_lat_BxTxHxC.shape
  R = q_rope_BxTxHxR.shape[-1]
  CR = ckr_BxSxCR.shape[-1]
  K = idx_BxTxK.shape[-1]
  dt = q_lat_BxTxHxC.dtype
  if reason := unsupported_reason(H, C, R, K, dt):
    raise ValueError(reason)
  if CR != C + R or ckr_BxSxCR.dtype != dt or q_rope_BxTxHxR.dtype != dt:
    raise ValueError(f"sparse_mla mma kernel: ckr must be [B, S, C+R] = [.., .., {C + R}] "
                     f"and q_rope [B, T, H, R], both in q_lat's {dt}; got ckr "
                     f"{ckr_BxSxCR.shape} {ckr_BxSxCR.dtype}, q_rope {q_rope_BxTxHxR.dtype}")
  return B, T, H, C, R, CR, K, dt


def _gather(ckr_SxCR, idx_keys, lat_smem, tail_smem, *, C: int, keys: int, group: int):
  """A step's selected rows (ids idx_keys[0..keys), -1 invalid: row 0, masked later) into
  SMEM by the whole warpgroup: each row's latent [C] and its last TAIL columns (the rope
  key's R are its end), `group` rows' loads issued before their stores."""
  CR = ckr_SxCR.shape[-1]
  lat_layout = plgpu.Layout.WG_STRIDED((C,), vec_size=C // 128)
  tail_layout = plgpu.Layout.WG_STRIDED((TAIL,), vec_size=1)
  for g in range(keys // group):
    ks = range(g * group, (g + 1) * group)
    rows = [jnp.maximum(idx_keys[k], 0) for k in ks]
    vals = [(plgpu.load(ckr_SxCR.at[r, pl.ds(0, C)], layout=lat_layout, optimized=False),
             plgpu.load(ckr_SxCR.at[r, pl.ds(CR - TAIL, TAIL)], layout=tail_layout,
                        optimized=False)) for r in rows]
    for k, (lat, tail) in zip(ks, vals):
      lat_smem[k, pl.ds(0, C)] = lat
      tail_smem[k, pl.ds(0, TAIL)] = tail


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "row_pad", "group",
                                             "step_probs", "_ablate"))
def sparse_mla_fwd(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, *, scale: float,
                   interpret: bool | plgpu.InterpretGPUParams = False, row_pad: int = ROW_PAD,
                   group: int = GROUP, step_probs: bool = False, _ablate: str = ""):
  """o_lat [B,T,H,C] (q_lat's dtype) and lse [B,T,H] float32 (natural log). idx: int32,
  -1 = invalid; K is padded to a multiple of 64 with -1. interpret: True (or the
  interpreter's parameters) runs it in the GPU interpreter (on CPU; the MMAs as dots).
  step_probs: also each step's P and running maximum as the online softmax has them,
  p_steps [B,T,N,H,64] (q_lat's dtype; N = K/64 steps, rounded up) = exp2(score2 - m) and
  m_steps [B,T,N,H] float32 (score2: the scaled score in base 2), from which
  `probs_from_steps` gives `sparse_mla_probs`'s p without a second pass over the keys
  (4.3 GB at 64k tokens, K = 2048: written once, read once).
  row_pad (bf16 columns after each SMEM row, a multiple of 8) and group (keys loaded before
  their stores, dividing 64) are tuning knobs; _ablate ("no_gather": the step's rows are not
  loaded; "no_mma": no products) is for benchmarks/dsa.py's timing of the kernel's parts,
  and its results are wrong."""
  return _sparse_mla(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, None, scale=scale,
                     interpret=interpret, row_pad=row_pad, group=group, ablate=_ablate,
                     step_probs=step_probs)


def probs_from_steps(p_steps_BxTxNxHxKEYS, m_steps_BxTxNxH, lse_BxTxH, idx_BxTxK):
  """`sparse_mla_probs`'s p [B,T,K] float32 from the forward's step_probs outputs (XLA, one
  pass): p[t, 64 n + j] = sum_h p_steps[t, n, h, j] exp2(m_steps[t, n, h] - lse2[t, h]) / H
  on the valid keys (idx >= 0), 0 on the others. p_steps is rounded to its dtype (bf16:
  within 2^-9 of the float32 form, relatively)."""
  B, T, N, H, _ = p_steps_BxTxNxHxKEYS.shape
  K = idx_BxTxK.shape[-1]
  lse2_BxTxH = lse_BxTxH.astype(jnp.float32) * math.log2(math.e)
  f_BxTxNxH = jnp.exp2(m_steps_BxTxNxH - lse2_BxTxH[:, :, None, :])
  p_BxTxNxKEYS = jnp.einsum("btnhk,btnh->btnk", p_steps_BxTxNxHxKEYS.astype(jnp.float32),
                            f_BxTxNxH) * (1.0 / H)
  p_BxTxK = p_BxTxNxKEYS.reshape(B, T, N * KEYS)[..., :K]
  return jnp.where(idx_BxTxK >= 0, p_BxTxK, 0.0)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def sparse_mla_probs(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, lse_BxTxH, *,
                     scale: float, interpret: bool | plgpu.InterpretGPUParams = False):
  """p [B,T,K] float32: sum over heads of exp(score - lse) / H on the valid keys, 0 on the
  invalid (idx -1): the forward's head-averaged probabilities (the DSA indexer KL's
  target), from the forward's LSE. The same kernel without P x latent: per step the gather
  and the score products, then the column sums of P."""
  return _sparse_mla(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, lse_BxTxH,
                     scale=scale, interpret=interpret, row_pad=ROW_PAD, group=GROUP, ablate="")


def _sparse_mla(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, lse_in_BxTxH, *,
                scale, interpret, row_pad, group, ablate, step_probs=False):
  """The kernel: the forward (lse_in None; step_probs: with its steps' P and maxima) or the
  probabilities from a given LSE."""
  probs = lse_in_BxTxH is not None
  B, T, H, C, R, CR, K, dt = _checked_shapes(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR,
                                             idx_BxTxK)
  if probs and lse_in_BxTxH.shape != (B, T, H):
    raise ValueError(f"sparse_mla mma kernel: lse must be [B, T, H] = {(B, T, H)}, got "
                     f"{lse_in_BxTxH.shape}")
  if row_pad % 8 or row_pad < 0 or KEYS % group or ablate not in ("", "no_gather", "no_mma"):
    raise ValueError(f"sparse_mla mma kernel: row_pad must be a multiple of 8, group divide "
                     f"{KEYS}, _ablate '', 'no_gather' or 'no_mma'; got {row_pad}, {group}, "
                     f"{ablate!r}")
  Kp = -(-K // KEYS) * KEYS
  idx_BxTxNxKEYS = jnp.pad(idx_BxTxK.astype(jnp.int32), ((0, 0), (0, 0), (0, Kp - K)),
                           constant_values=-1).reshape(B, T, Kp // KEYS, KEYS)
  lhs = plgpu.Layout.MMA_LHS(dt, m_warps=1)
  rhs = plgpu.Layout.MMA_RHS(dt, m_warps=1)
  acc = plgpu.Layout.MMA_ACC(dt, m_warps=1)
  row, col = acc.reduce(1), acc.reduce(0)  # per head; per key
  log2e = math.log2(math.e)
  products = ablate != "no_mma"

  def zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), acc)

  def across(v_H, cols):  # a per-head value as an [H, cols] accumulator-layout tile
    return plgpu.layout_cast(lax.broadcast_in_dim(v_H, (H, cols), (0,)), acc)

  def kernel(ql_ref, qr_ref, ckr_ref, idx_ref, *refs):
    if probs:
      lse_in_ref, p_ref, *scratch = refs
    elif step_probs:
      o_ref, lse_ref, pst_ref, mst_ref, *scratch = refs
    else:
      o_ref, lse_ref, *scratch = refs
    p_smem, lat_smem, tail_smem, idx_smem, bar = scratch
    b, t = lax.axis_index("b"), lax.axis_index("t")
    plgpu.copy_gmem_to_smem(idx_ref.at[b, t], idx_smem, bar)
    q_chunks = [plgpu.load(ql_ref.at[b, t, :, pl.ds(c * CHUNK, CHUNK)], layout=lhs,
                           optimized=False) for c in range(C // CHUNK)]
    q_chunks += [plgpu.load(qr_ref.at[b, t, :, pl.ds(c * CHUNK, CHUNK)], layout=lhs,
                            optimized=False) for c in range(R // CHUNK)]
    plgpu.barrier_wait(bar)

    def gather_and_score(st):
      """The step's 64 selected rows into SMEM, then their scores [H, 64] (base 2, scaled;
      invalid keys at _MASKED) and the valid mask."""
      plgpu.commit_smem()  # every thread is done with the previous step's tiles
      if ablate != "no_gather":
        _gather(ckr_ref.at[b], idx_smem.at[st], lat_smem, tail_smem, C=C, keys=KEYS,
                group=group)
      plgpu.commit_smem()  # the step's rows, stored by all threads, are read by all
      s = zeros((H, KEYS))
      for c in range(C // CHUNK if products else 0):  # scores: q_lat . latent (B: tile^T)
        k = plgpu.load(lat_smem.at[:, pl.ds(c * CHUNK, CHUNK)].T, layout=rhs, optimized=False)
        s = mma(s, q_chunks[c], k, bool(interpret))
      for c in range(R // CHUNK if products else 0):  # + q_rope . k_rope (the tail's end)
        k = plgpu.load(tail_smem.at[:, pl.ds(TAIL - R + c * CHUNK, CHUNK)].T, layout=rhs,
                       optimized=False)
        s = mma(s, q_chunks[C // CHUNK + c], k, bool(interpret))
      valid = plgpu.load(idx_smem.at[st], layout=col, optimized=False) >= 0
      valid = plgpu.layout_cast(lax.broadcast_in_dim(valid, (H, KEYS), (1,)), acc)
      return jnp.where(valid, s * (scale * log2e), _MASKED), valid  # base 2 from here

    if probs:  # p = exp2(s - lse2) per head, summed over the heads, a step's 64 keys
      lse2 = plgpu.load(lse_in_ref.at[b, t], layout=row, optimized=False) * log2e

      @pl.loop(0, Kp // KEYS)
      def _(st):
        s, valid = gather_and_score(st)
        p = jnp.where(valid, jnp.exp2(s - across(lse2, KEYS)), 0.0)
        p_ref[b, t, pl.ds(st * KEYS, KEYS)] = plgpu.layout_cast(p.sum(axis=0), col) * (1 / H)
      return

    def step(st, carry):
      outs, m_run, l_run = carry
      s, _ = gather_and_score(st)
      m_new = jnp.maximum(m_run, plgpu.layout_cast(s.max(axis=1), row))
      alpha = jnp.exp2(m_run - m_new)
      p = jnp.exp2(s - across(m_new, KEYS))
      l_new = l_run * alpha + plgpu.layout_cast(p.sum(axis=1), row)
      if step_probs:  # this step's P and maxima, for probs_from_steps
        pst_ref[b, t, st] = p.astype(dt)
        mst_ref[b, t, st] = m_new
      p_smem[:, pl.ds(0, KEYS)] = p.astype(dt)
      plgpu.commit_smem()  # P, stored by all threads, is the A operand of all
      p_lhs = plgpu.load(p_smem.at[:, pl.ds(0, KEYS)], layout=lhs, optimized=False)
      new_outs = []
      for i, o in enumerate(outs):  # o_i += P . latent[:, i-th 128 columns] (as stored)
        o = o * across(alpha, OUT_COLS)
        if products:
          v = plgpu.load(lat_smem.at[:, pl.ds(i * OUT_COLS, OUT_COLS)], layout=rhs,
                         optimized=False)
          o = mma(o, p_lhs, v, bool(interpret))
        new_outs.append(o)
      return tuple(new_outs), m_new, l_new

    init = (tuple(zeros((H, OUT_COLS)) for _ in range(C // OUT_COLS)),
            plgpu.layout_cast(jnp.full((H,), -jnp.inf, jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((H,), jnp.float32), row))
    outs, m_run, l_run = lax.fori_loop(0, Kp // KEYS, step, init)
    inv = across(1.0 / l_run, OUT_COLS)  # l >= 1: the largest score's p is 1
    for i, o in enumerate(outs):
      o_ref[b, t, :, pl.ds(i * OUT_COLS, OUT_COLS)] = (o * inv).astype(dt)
    lse_ref[b, t] = (m_run + jnp.log2(l_run)) * (1.0 / log2e)  # natural log of scaled scores

  if probs:
    out_type = jax.ShapeDtypeStruct((B, T, Kp), jnp.float32)
    args = (lse_in_BxTxH.astype(jnp.float32),)
  else:
    out_type = (jax.ShapeDtypeStruct((B, T, H, C), dt),
                jax.ShapeDtypeStruct((B, T, H), jnp.float32))
    if step_probs:
      out_type += (jax.ShapeDtypeStruct((B, T, Kp // KEYS, H, KEYS), dt),
                   jax.ShapeDtypeStruct((B, T, Kp // KEYS, H), jnp.float32))
    args = ()
  out = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(B, T), grid_names=("b", "t"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                           unsafe_no_auto_barriers=True),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None),
      scratch_types=[plgpu.SMEM((H, KEYS + row_pad), dt), plgpu.SMEM((KEYS, C + row_pad), dt),
                     plgpu.SMEM((KEYS, TAIL + row_pad), dt),
                     plgpu.SMEM((Kp // KEYS, KEYS), jnp.int32), plgpu.Barrier(num_arrivals=1)],
  )(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxNxKEYS, *args)
  return out[..., :K] if probs else out


# ------------------------------------------------------------------------------ backward

BWD_KEYS = 32  # keys a backward step (its f32 staging of the keys' gradients: 72 KB)
ATOMIC_PAD = 8  # reduce="atomic": staging rows 8 floats further apart (stores 2-way, not 8-way)
BWD_ABLATIONS = ("", "no_reduce", "no_dk", "no_gather", "add_invalid")


def _rows_layout(rows: int, cols: int):
  """A warpgroup-strided layout of a [rows, cols] bf16 tile, 16-byte vectors a thread."""
  return plgpu.Layout.WG_STRIDED((rows, cols), vec_size=8)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "reduce", "_ablate"))
def sparse_mla_bwd(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, lse_BxTxH, g_BxTxHxC,
                   delta_BxTxH, *, scale: float,
                   interpret: bool | plgpu.InterpretGPUParams = False, reduce: str = "atomic",
                   _ablate: str = ""):
  """The gradients of `sparse_mla_fwd`'s o_lat: (dq_lat [B,T,H,C] and dq_rope [B,T,H,R] in
  the queries' dtypes, dckr [B,S,C+R] float32), given its LSE, the output's cotangent g and
  delta = sum_c g * o [B,T,H] (float32). idx as the forward's (-1 invalid).

  One CTA a query, as the forward, BWD_KEYS keys a step: the rows gathered into SMEM, the
  scores again, p = exp(score - lse), dp = g . c (g as A operand from SMEM), ds = p (dp -
  delta) scale; dq += ds . [c | k_rope] (registers, 72 a thread); the keys' gradients
  [32, C+R] = ds^T [q_lat | q_rope] + p^T [g | 0] on the 16-row MMA with two warps along
  the keys, staged in SMEM (f32), then added into dckr by one TMA reduce-add a key (dckr
  viewed as [B, S, 3, (C+R)/3]: a box is at most 256 wide); a step's adds are waited for
  (read from SMEM) before the next step's staging.
  Invalid keys (idx -1) have p = ds = 0 and add nothing (until the seventeenth session
  their zero rows were added to row 0: at 16k, K = 2048, 6.2% of all adds into one row;
  _ablate="add_invalid" keeps that for benchmarks/dsa.py's comparison).
  reduce="atomic" adds the staged rows by the whole warpgroup instead, as `red.global.add`s
  (`plgpu.atomic_add`; the rows padded to a multiple of 128 columns, the staging rows
  ATOMIC_PAD floats further apart, which a TMA source cannot be): no one-thread issue and
  no wait on the copies. On the H200 (16k, notes_dsa.md, thirteenth session) both ways add
  at ~2.2 TB/s; the adds are more than half the kernel's time either way. Atomics are the
  default: with position-ordered keys 43.1 ms against 47.6 at 16k (twentieth session),
  196.5 against 208.8 at 64k, 452 against 480 at 128k (twenty-first).
  (Two variants measured and removed, notes_dsa.md: each query's steps rotated, so that
  neighbouring queries add into different rows at once, gave nothing; the keys in 4 or 8
  position ranges, a launch each, so that a range's adds stay in the L2, gave 4% at 64k
  and lost 7% at 128k.)
  interpret: the GPU interpreter (on CPU), where the MMAs are dots and, as it has neither
  TMA reductions nor atomics, each key's row is added by a load, add and store (the
  interpreter runs the CTAs one after another). dckr starts as a zeroed `jax.new_ref` the
  kernel adds into. _ablate ("no_reduce": nothing added into dckr; "no_dk": nor the keys'
  gradients computed; "no_gather": the step's rows not loaded) is for benchmarks/dsa.py's
  timing of the kernel's parts, and its results are wrong (but "add_invalid"'s)."""
  B, T, H, C, R, CR, K, dt = _checked_shapes(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR,
                                             idx_BxTxK)
  S = ckr_BxSxCR.shape[1]
  if CR % 3 or g_BxTxHxC.shape != q_lat_BxTxHxC.shape:
    raise ValueError(f"sparse_mla mma backward: C+R must be a multiple of 3 and g shaped as "
                     f"q_lat; got C+R = {CR}, g {g_BxTxHxC.shape}, q_lat {q_lat_BxTxHxC.shape}")
  if reduce not in ("tma", "atomic") or _ablate not in BWD_ABLATIONS:
    raise ValueError(f"sparse_mla mma backward: reduce must be 'tma' or 'atomic' and _ablate "
                     f"one of {BWD_ABLATIONS}; got {reduce!r}, {_ablate!r}")
  atomic = reduce == "atomic"
  AC = -(-CR // 128) * 128  # reduce="atomic": a key's row in AC / 128 floats a thread
  N = -(-K // BWD_KEYS)  # steps; the idx row padded to 128 keys (one load by the warpgroup)
  Kp = -(-K // 128) * 128
  idx_BxTxNxKEYS = jnp.pad(idx_BxTxK.astype(jnp.int32), ((0, 0), (0, 0), (0, Kp - K)),
                           constant_values=-1).reshape(B, T, Kp // BWD_KEYS, BWD_KEYS)
  KB, third = BWD_KEYS, CR // 3
  lhs = plgpu.Layout.MMA_LHS(dt, m_warps=1)
  rhs = plgpu.Layout.MMA_RHS(dt, m_warps=1)
  acc = plgpu.Layout.MMA_ACC(dt, m_warps=1)
  lhs2 = plgpu.Layout.MMA_LHS(dt, m_warps=2)  # the keys' gradients: 32 rows, 2 warps along M
  rhs2 = plgpu.Layout.MMA_RHS(dt, m_warps=2)
  acc2 = plgpu.Layout.MMA_ACC(dt, m_warps=2)
  row, col = acc.reduce(1), acc.reduce(0)
  log2e = math.log2(math.e)
  f32 = jnp.float32
  pad = ROW_PAD

  def zeros(shape, layout=acc):
    return plgpu.layout_cast(jnp.zeros(shape, f32), layout)

  def across(v_H, cols):
    return plgpu.layout_cast(lax.broadcast_in_dim(v_H, (H, cols), (0,)), acc)

  def kernel(ql_ref, qr_ref, ckr_ref, idx_ref, lse_ref, g_ref, delta_ref, dckr_ref, dql_ref,
             dqr_ref, q_smem, g_smem, lat_smem, tail_smem, ds_smem, p_smem, stage, idx_smem):
    b, t = lax.axis_index("b"), lax.axis_index("t")
    idx_smem[...] = plgpu.load(idx_ref.at[b, t], optimized=False,
                               layout=plgpu.Layout.WG_STRIDED((Kp // KB, KB), vec_size=1))
    q_smem[:, pl.ds(0, C)] = plgpu.load(ql_ref.at[b, t], layout=_rows_layout(H, C),
                                        optimized=False)
    q_smem[:, pl.ds(C, R)] = plgpu.load(qr_ref.at[b, t], layout=_rows_layout(H, R),
                                        optimized=False)
    g_smem[:, pl.ds(0, C)] = plgpu.load(g_ref.at[b, t], layout=_rows_layout(H, C),
                                        optimized=False)
    lse2 = plgpu.load(lse_ref.at[b, t], layout=row, optimized=False) * log2e
    delta = plgpu.load(delta_ref.at[b, t], layout=row, optimized=False)

    if atomic and AC > CR:  # the padding columns of the staged rows: zeros, added as such
      stage[:, pl.ds(CR, AC - CR)] = zeros((KB, AC - CR), acc2)

    def step(st, dq):  # the step's keys: idx_smem[st]
      if not interpret and not atomic:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last step's adds read stage
      plgpu.commit_smem()  # and every thread is done with the last step's tiles
      if _ablate != "no_gather":
        _gather(ckr_ref.at[b], idx_smem.at[st], lat_smem, tail_smem, C=C, keys=KB,
                group=GROUP)
      plgpu.commit_smem()
      s, dp = zeros((H, KB)), zeros((H, KB))
      for c in range(C // CHUNK):  # scores and dp = g . c, the latent read transposed
        k = plgpu.load(lat_smem.at[:, pl.ds(c * CHUNK, CHUNK)].T, layout=rhs, optimized=False)
        cols = pl.ds(c * CHUNK, CHUNK)
        s = mma(s, plgpu.load(q_smem.at[:, cols], layout=lhs, optimized=False), k,
                bool(interpret))
        dp = mma(dp, plgpu.load(g_smem.at[:, cols], layout=lhs, optimized=False), k,
                 bool(interpret))
      for c in range(R // CHUNK):
        k = plgpu.load(tail_smem.at[:, pl.ds(TAIL - R + c * CHUNK, CHUNK)].T, layout=rhs,
                       optimized=False)
        s = mma(s, plgpu.load(q_smem.at[:, pl.ds(C + c * CHUNK, CHUNK)], layout=lhs,
                              optimized=False), k, bool(interpret))
      valid = plgpu.load(idx_smem.at[st], layout=col, optimized=False) >= 0
      valid = plgpu.layout_cast(lax.broadcast_in_dim(valid, (H, KB), (1,)), acc)
      p = jnp.where(valid, jnp.exp2(s * (scale * log2e) - across(lse2, KB)), 0.0)
      ds = p * (dp - across(delta, KB)) * scale
      ds_smem[:, pl.ds(0, KB)] = ds.astype(dt)
      p_smem[:, pl.ds(0, KB)] = p.astype(dt)
      plgpu.commit_smem()  # ds and p, stored by all threads, are operands of all
      ds_lhs = plgpu.load(ds_smem.at[:, pl.ds(0, KB)], layout=lhs, optimized=False)
      new_dq = []
      for i, d in enumerate(dq):  # dq[:, i-th 64 columns] += ds . [c | k_rope] (as stored)
        v = (lat_smem.at[:, pl.ds(i * CHUNK, CHUNK)] if i < C // CHUNK
             else tail_smem.at[:, pl.ds(TAIL - R + (i - C // CHUNK) * CHUNK, CHUNK)])
        new_dq.append(mma(d, ds_lhs, plgpu.load(v, layout=rhs, optimized=False),
                          bool(interpret)))
      if _ablate == "no_dk":
        return tuple(new_dq)
      ds_t = plgpu.load(ds_smem.at[:, pl.ds(0, KB)].T, layout=lhs2, optimized=False)
      p_t = plgpu.load(p_smem.at[:, pl.ds(0, KB)].T, layout=lhs2, optimized=False)
      for j in range(CR // CHUNK):  # the keys' gradients, 64 columns at a time, into stage
        cols = pl.ds(j * CHUNK, CHUNK)
        dk = mma(zeros((KB, CHUNK), acc2), ds_t,
                 plgpu.load(q_smem.at[:, cols], layout=rhs2, optimized=False), bool(interpret))
        if j < C // CHUNK:
          dk = mma(dk, p_t, plgpu.load(g_smem.at[:, cols], layout=rhs2, optimized=False),
                   bool(interpret))
        if atomic:
          stage[:, pl.ds(j * CHUNK, CHUNK)] = dk
        else:
          stage[:, (j * CHUNK) // third, pl.ds((j * CHUNK) % third, CHUNK)] = dk
      plgpu.commit_smem()  # the staged rows, stored by all threads, are read by the adds
      if _ablate == "no_reduce":
        return tuple(new_dq)
      for k in range(KB):
        key = idx_smem[st, k]
        r = jnp.maximum(key, 0)

        @pl.when((key >= 0) | (_ablate == "add_invalid"))   # invalid keys add nothing
        def _add():
          if interpret and atomic:
            rows = pl.ds(b * S + r, 1)
            dckr_ref[rows, :] = dckr_ref[rows, :] + stage[pl.ds(k, 1), pl.ds(0, AC)]
          elif interpret:
            dckr_ref[b, r] = dckr_ref[b, r] + stage[k]
          elif atomic:  # every thread AC / 128 of the row's floats, a warp 128 contiguous B
            row_layout = plgpu.Layout.WG_STRIDED((1, AC), vec_size=1)
            plgpu.atomic_add(dckr_ref.at[pl.ds(b * S + r, 1)],
                             plgpu.load(stage.at[pl.ds(k, 1), pl.ds(0, AC)],
                                        layout=row_layout, optimized=False))
          else:
            plgpu.copy_smem_to_gmem(stage.at[k], dckr_ref.at[b, r], commit_group=False,
                                    reduction_op="add")
      if not interpret and not atomic:
        plgpu.commit_smem_to_gmem_group()
      return tuple(new_dq)

    dq = lax.fori_loop(0, N, step, tuple(zeros((H, CHUNK)) for _ in range(CR // CHUNK)))
    for i, d in enumerate(dq):
      if i < C // CHUNK:
        dql_ref[b, t, :, pl.ds(i * CHUNK, CHUNK)] = d.astype(dt)
      else:
        dqr_ref[b, t, :, pl.ds((i - C // CHUNK) * CHUNK, CHUNK)] = d.astype(dt)
    if not interpret and not atomic:
      plgpu.wait_smem_to_gmem(0)

  # dckr starts zeroed; the kernel adds into it
  dckr = jax.new_ref(jnp.zeros((B * S, AC) if atomic else (B, S, 3, third), f32))
  stage_type = (plgpu.SMEM((KB, AC + ATOMIC_PAD), f32) if atomic
                else plgpu.SMEM((KB, 3, third), f32))
  call = functools.partial(
      plgpu.kernel, kernel,
      out_type=(jax.ShapeDtypeStruct((B, T, H, C), dt),
                jax.ShapeDtypeStruct((B, T, H, R), dt)),
      grid=(B, T), grid_names=("b", "t"),
      scratch_types=[plgpu.SMEM((H, CR + pad), dt), plgpu.SMEM((H, C + pad), dt),
                      plgpu.SMEM((KB, C + pad), dt), plgpu.SMEM((KB, TAIL + pad), dt),
                      plgpu.SMEM((H, KB + pad), dt), plgpu.SMEM((H, KB + pad), dt),
                      stage_type, plgpu.SMEM((Kp // KB, KB), jnp.int32)],
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                           unsafe_no_auto_barriers=True),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None))
  ins = (q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxNxKEYS, lse_BxTxH.astype(f32),
         g_BxTxHxC.astype(dt), delta_BxTxH.astype(f32))
  dql, dqr = call()(*ins, dckr)
  dckr = dckr[...]
  return dql, dqr, (dckr.reshape(B, S, AC)[..., :CR] if atomic
                    else dckr.reshape(B, S, CR))
