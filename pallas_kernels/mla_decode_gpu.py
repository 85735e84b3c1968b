"""MLA decode attention in latent form as a Mosaic GPU kernel (EXPERIMENTAL: lowers for
CUDA, not yet run on a GPU; `generate` does not use it).

    o_lat = mla_decode(q_lat [B,H,C], q_rope [B,H,R], latent [B,S,C], k_rope [B,S,R],
                       lengths [B], scale)

score[b, h, s] = scale · (q_lat[b, h] · latent[b, s] + q_rope[b, h] · k_rope[b, s]) for
the visible slots s < lengths[b] (at least 1), softmax over them,
o_lat[b, h] = Σ_s p · latent[b, s]: the absorbed attention of one decoded token per row
(`attention.MLA.decode`), reading each cached slot once.

Why a kernel: XLA reads the cache twice (the score product, then P x V), ~0.64 ms each at
MoHGE-3B batch 256 on the H200, plus ~10 small kernels a layer around them
(benchmarks/notes_generate.md). Why this form: a query's 16 heads are the M dimension of
Hopper's warp-level MMA (`plgpu.mma`, mma.sync, accumulator tiles of 16 rows with
m_warps=1): nothing padded, the scores computed once (wgmma would pad 16 heads to 64 rows).

Layout of the work (first version, no pipelining): one CTA (one warpgroup, Lane semantics)
per batch row; per step of 64 slots (only up to the row's last visible slot: the rest of
the cache is not read), the scores [H, 64] accumulate over the latent in 64-
column chunks plus the rope chunk (operands loaded by all threads straight from GMEM: the
B operand wants its contraction dimension contiguous, which the cache's rows give);
online softmax along the slots (rows are heads); P goes through SMEM as the A operand of
P x latent. That product contracts over the slots, the cache's strided dimension, so its
B operand cannot come from GMEM so: the step's latent block is copied to SMEM by TMA
(from L2: its 64 KB were just read) and loaded from there element-wise (`optimized=False`;
an ldmatrix-transposed load would be the faster form). Output [H, C] in four [H, 128]
accumulators.

Status: lowers for CUDA (tested on CPU); the GPU interpreter cannot run `plgpu.mma`, so its
numerics and speed are for `tests/test_mla_decode_gpu.py` and `benchmarks/mla_decode.py`
on an H200.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SLOTS = 64    # cache slots per step
CHUNK = 64    # contraction columns per MMA (scores)
OUT_COLS = 128  # output columns per accumulator (P x latent)
TMA_COLS = 256  # columns per TMA copy (a box is at most 256 elements a dimension)


def unsupported_reason(H: int, C: int, R: int, S: int, dtype) -> str | None:
  """Why these shapes cannot run (None when they can)."""
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return f"mla_decode kernel: dtype must be bfloat16, got {jnp.dtype(dtype).name}"
  if H != 16:
    return f"mla_decode kernel: heads must be 16 (the MMA's M), got {H}"
  if C % TMA_COLS or R % CHUNK:
    return (f"mla_decode kernel: latent dim must be a multiple of {TMA_COLS} and rope dim "
            f"of {CHUNK}; got C={C}, R={R}")
  if S % SLOTS:
    return f"mla_decode kernel: cache slots must be a multiple of {SLOTS}, got {S}"
  return None


def reference(q_lat, q_rope, latent, k_rope, lengths, scale):
  """The same attention in plain JAX (float32 softmax), the kernel's test reference."""
  s = (jnp.einsum("bhc,bsc->bhs", q_lat, latent, preferred_element_type=jnp.float32)
       + jnp.einsum("bhr,bsr->bhs", q_rope, k_rope, preferred_element_type=jnp.float32))
  visible = jnp.arange(latent.shape[1])[None, None, :] < lengths[:, None, None]
  p = jax.nn.softmax(jnp.where(visible, s * scale, -jnp.inf), axis=-1)
  return jnp.einsum("bhs,bsc->bhc", p.astype(latent.dtype), latent,
                    preferred_element_type=jnp.float32).astype(latent.dtype)


@functools.partial(jax.jit, static_argnames=("scale",))
def mla_decode(q_lat_BxHxC, q_rope_BxHxR, latent_BxSxC, k_rope_BxSxR, lengths_B, *,
               scale: float):
  """o_lat [B, H, C] (see the module docstring); lengths_B: visible slots per row (>= 1)."""
  B, H, C = q_lat_BxHxC.shape
  S, R = latent_BxSxC.shape[1], k_rope_BxSxR.shape[2]
  dt = latent_BxSxC.dtype
  reason = unsupported_reason(H, C, R, S, dt)
  if reason:
    raise ValueError(reason)
  lhs = plgpu.Layout.MMA_LHS(dt, m_warps=1)
  rhs = plgpu.Layout.MMA_RHS(dt, m_warps=1)
  acc = plgpu.Layout.MMA_ACC(dt, m_warps=1)
  row = acc.reduce(1)
  log2e = math.log2(math.e)

  def zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), acc)

  def kernel(ql_ref, qr_ref, lat_ref, kr_ref, len_ref, o_ref, p_smem, lat_smem, bar):
    b = lax.axis_index("b")
    visible = jnp.minimum(len_ref[b], S)  # slots 0..visible-1 of this row's cache
    q_chunks = [plgpu.load(ql_ref.at[b, :, pl.ds(c * CHUNK, CHUNK)], layout=lhs,
                           optimized=False) for c in range(C // CHUNK)]
    q_chunks += [plgpu.load(qr_ref.at[b, :, pl.ds(c * CHUNK, CHUNK)], layout=lhs,
                            optimized=False) for c in range(R // CHUNK)]

    def step(i, carry):
      outs, m_run, l_run = carry
      slots = pl.ds(i * SLOTS, SLOTS)
      s = zeros((H, SLOTS))
      for c in range(C // CHUNK):  # scores: q_lat . latent (B operand: slots' rows, transposed)
        k = plgpu.load(lat_ref.at[b, slots, pl.ds(c * CHUNK, CHUNK)].T,
                       layout=rhs, optimized=False)
        s = plgpu.mma(s, q_chunks[c], k)
      for c in range(R // CHUNK):  # + q_rope . k_rope
        k = plgpu.load(kr_ref.at[b, slots, pl.ds(c * CHUNK, CHUNK)].T,
                       layout=rhs, optimized=False)
        s = plgpu.mma(s, q_chunks[C // CHUNK + c], k)
      slot = plgpu.broadcasted_iota(jnp.int32, (H, SLOTS), 1, layout=acc) + i * SLOTS
      s = jnp.where(slot < visible, s * (scale * log2e), -jnp.inf)  # base 2 from here
      m_new = jnp.maximum(m_run, plgpu.layout_cast(s.max(axis=1), row))
      m_safe = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
      alpha = jnp.exp2(m_run - m_safe)
      p = jnp.exp2(s - plgpu.layout_cast(lax.broadcast_in_dim(m_safe, s.shape, (0,)), acc))
      l_new = l_run * alpha + plgpu.layout_cast(p.sum(axis=1), row)
      p_smem[...] = p.astype(dt)
      p_lhs = plgpu.load(p_smem, layout=lhs, optimized=False)
      new_outs = []
      # P x latent: the contraction runs over the slots, which are the latent's rows, not
      # contiguous: the MMA's B operand cannot be loaded so from GMEM; from SMEM (one TMA
      # copy of the block) it goes element by element.
      # Reuse of lat_smem across steps: the copy below is issued after this step's store
      # to p_smem, before which Pallas puts a warpgroup barrier (auto_barriers: earlier
      # reads done), so every thread has finished reading the previous step's block.
      for h in range(C // TMA_COLS):  # a TMA box is at most 256 wide
        cols = pl.ds(h * TMA_COLS, TMA_COLS)
        plgpu.copy_gmem_to_smem(lat_ref.at[b, slots, cols], lat_smem.at[h], bar)
      plgpu.barrier_wait(bar)
      for j, o in enumerate(outs):  # o_j += P . latent[:, j-th 128 columns]
        per = TMA_COLS // OUT_COLS
        v = plgpu.load(lat_smem.at[j // per, :, pl.ds(j % per * OUT_COLS, OUT_COLS)],
                       layout=rhs, optimized=False)
        o = o * plgpu.layout_cast(lax.broadcast_in_dim(alpha, o.shape, (0,)), acc)
        new_outs.append(plgpu.mma(o, p_lhs, v))
      return tuple(new_outs), m_new, l_new

    init = (tuple(zeros((H, OUT_COLS)) for _ in range(C // OUT_COLS)),
            plgpu.layout_cast(jnp.full((H,), -jnp.inf, jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((H,), jnp.float32), row))
    # only the steps with a visible slot (the rest of the cache is not read)
    outs, _, l_run = lax.fori_loop(0, (visible + SLOTS - 1) // SLOTS, step, init)
    inv = plgpu.layout_cast(lax.broadcast_in_dim(1.0 / jnp.maximum(l_run, 1e-30),
                                                 (H, OUT_COLS), (0,)), acc)
    for j, o in enumerate(outs):
      o_ref[b, :, pl.ds(j * OUT_COLS, OUT_COLS)] = (o * inv).astype(dt)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((B, H, C), dt),
      grid=(B,), grid_names=("b",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      scratch_types=[plgpu.SMEM((H, SLOTS), dt), plgpu.SMEM((C // TMA_COLS, SLOTS, TMA_COLS), dt),
                     plgpu.Barrier(num_arrivals=C // TMA_COLS)],
  )(q_lat_BxHxC, q_rope_BxHxR, latent_BxSxC, k_rope_BxSxR, lengths_B.astype(jnp.int32))
