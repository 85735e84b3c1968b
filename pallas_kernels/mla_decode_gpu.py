"""MLA decode attention in latent form as a Mosaic GPU kernel (`model.decode_attention`:
auto takes it on a Hopper GPU from batch 32, pallas always).

    o_lat = mla_decode(q_lat [B,H,C], q_rope [B,H,R], latent [B,S,C], k_rope [B,S,R],
                       lengths [B], scale, splits=None, impl="wgmma")

Two forms: impl="wgmma" (the default since the twelfth session: `_mla_decode_wgmma`, both
products transposed on the warpgroup MMA so that the 16 heads are N, every operand read
from SMEM by the tensor cores; 0.07 ms a layer at MoHGE-3B batch 256 against 0.078 for
"mma", and the decode step 4.10-4.13 ms against 4.28-4.30) and impl="mma", the warp-level
MMA form this docstring describes from here on.

score[b, h, s] = scale · (q_lat[b, h] · latent[b, s] + q_rope[b, h] · k_rope[b, s]) for
the visible slots s < lengths[b] (at least 1), softmax over them,
o_lat[b, h] = Σ_s p · latent[b, s]: the absorbed attention of one decoded token per row
(`attention.MLA.decode`), reading each cached slot once.

Why a kernel: XLA reads the cache twice (the score product, then P x V), ~0.64 ms each at
MoHGE-3B batch 256 on the H200, plus ~10 small kernels a layer around them
(benchmarks/notes_generate.md). Why this form: a query's 16 heads are the M dimension of
Hopper's warp-level MMA (`plgpu.mma`, mma.sync, accumulator tiles of 16 rows with
m_warps=1): nothing padded, the scores computed once (wgmma would pad 16 heads to 64 rows).

Layout of the work: one CTA (one warpgroup, Lane semantics) per batch row and split of its
slots (`splits`: flash-decoding, so that small batches still fill the GPU; the splits'
partial outputs and log-sum-exps are combined after the kernel). A CTA walks its steps of
64 slots (only those up to the row's last visible slot: the rest of the cache is not
read); each step's latent block [64, C] and rope block [64, R] come to SMEM by TMA, into a
ring of 2 slots (3 unpadded, below): the copy of step t+1 is issued during step t, once
every thread is done with the slot it overwrites. From SMEM, the scores [H, 64] accumulate over the
latent in 64-column chunks plus the rope chunk (the B operand read transposed), online
softmax along the slots (rows are heads), P goes through SMEM as the A operand of P x
latent, whose B operand is the same block read as stored. Output [H, C] in four [H, 128]
accumulators. Operands are loaded element-wise (`optimized=False`); ldmatrix loads from
swizzled SMEM would be the faster form.

Status: the first version (seventh session; one CTA a row, the scores' operands read from
GMEM, one TMA copy a step waited at once) was right on the H200 and no faster than XLA
(notes_generate.md). This one (the ring, the operands from SMEM, the splits) lowers for
CUDA and runs in the GPU interpreter on CPU (`interpret=True`: the interpreter has no
`plgpu.mma`, so the MMAs are dots there), both tested; on the H200 it is right and, with
the two changes below, 1.6x XLA at batch 256 (eighth session, notes_generate.md).

Bank conflicts (eighth session): an MMA operand fragment is read by a warp as 8 rows x 16
bytes (the scores' B operand, P) or 4 rows x 16 bytes (P x latent's); with SMEM rows a
multiple of 128 bytes apart (256-column boxes: 512 bytes) those rows share 4 of the 32
banks and every load is replayed 4-8 times. Now each 64-column chunk of the latent comes
by its own TMA box of CHUNK + ROW_PAD = 72 columns (the last box starts 8 columns earlier,
so no box leaves the row), so its SMEM rows are 144 bytes apart: row r starts 4r banks on,
and 8 rows cover all 32. The boxes read 8 columns twice (from L2). At 72 columns the ring
holds 2 steps (3 x 8 x 64 x 72 x 2 bytes would pass the 227 KB of SMEM); row_pad=0 keeps
unpadded 64-column boxes (3 steps) for comparison. The rope block (64 columns) keeps its
conflicts: 1 of the scores' 9 chunks.

The copy issue (eighth session, `early_fetch`, default): a step's copy is issued when the
step before starts, after a warpgroup barrier, so it has a whole step to land (issued after
the step before's scores it had half: 0.102 against 0.080 ms a layer at batch 256).
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
CHUNK = 64    # contraction columns per MMA (scores), output columns per accumulator (P x V)
ROW_PAD = 8   # extra bf16 columns per latent TMA box: its SMEM rows 144 bytes apart
AUTO_MIN_BATCH = 32  # decode_attention=auto uses the kernel from this batch (measured faster)
TARGET_CTAS = 132  # the H200's streaming multiprocessors (one CTA fits an SM)
RING_BOXES = 18  # impl="wgmma": [64, 64] boxes (8 KB) of the copy ring: 2 steps, 144 KB


def unsupported_reason(H: int, C: int, R: int, S: int, dtype) -> str | None:
  """Why these shapes cannot run (None when they can)."""
  if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return f"mla_decode kernel: dtype must be bfloat16, got {jnp.dtype(dtype).name}"
  if H != 16:
    return f"mla_decode kernel: heads must be 16 (the MMA's M), got {H}"
  if C % CHUNK or C < 2 * CHUNK or R % CHUNK:
    return (f"mla_decode kernel: latent dim must be a multiple of {CHUNK} (at least "
            f"{2 * CHUNK}) and rope dim of {CHUNK}; got C={C}, R={R}")
  if S % SLOTS:
    return f"mla_decode kernel: cache slots must be a multiple of {SLOTS}, got {S}"
  return None


def use_for_auto(B: int, H: int, C: int, R: int, S: int, dtype) -> bool:
  """model.decode_attention=auto: the kernel on a Hopper GPU for shapes it takes, from
  AUTO_MIN_BATCH rows (eighth session, H200: 1.6x XLA's products at batch 256 and 1.5x at
  32; 0.9x at 1, where the splits' combine and dispatch outweigh one read of 576 slots)."""
  import pallas_kernels  # noqa: PLC0415 - the package imports this module's siblings
  return (B >= AUTO_MIN_BATCH and unsupported_reason(H, C, R, S, dtype) is None
          and pallas_kernels.resolve_backend("auto") == "mosaic_gpu")


def reference(q_lat, q_rope, latent, k_rope, lengths, scale):
  """The same attention in plain JAX (float32 softmax), the kernel's test reference."""
  s = (jnp.einsum("bhc,bsc->bhs", q_lat, latent, preferred_element_type=jnp.float32)
       + jnp.einsum("bhr,bsr->bhs", q_rope, k_rope, preferred_element_type=jnp.float32))
  visible = jnp.arange(latent.shape[1])[None, None, :] < lengths[:, None, None]
  p = jax.nn.softmax(jnp.where(visible, s * scale, -jnp.inf), axis=-1)
  return jnp.einsum("bhs,bsc->bhc", p.astype(latent.dtype), latent,
                    preferred_element_type=jnp.float32).astype(latent.dtype)


def default_splits(B: int, S: int) -> int:
  """Splits of a row's slots: at least a CTA for each streaming multiprocessor (132 on an
  H200), at most one a step of SLOTS; none past one wave (the splits' partial outputs
  cost a write and a read of B x splits x H x C floats)."""
  return max(1, min(S // SLOTS, -(-TARGET_CTAS // B)))


def combine_splits(o_BxJxHxC, lse_BxJxH, dtype):
  """Each split's softmax-normalised output and its log2-sum-exp2 (-inf for a split with
  no visible slot) -> the row's output: splits weighted by their share of the mass."""
  top = jnp.max(lse_BxJxH, axis=1, keepdims=True)  # finite: split 0 always sees slot 0
  w = jnp.exp2(lse_BxJxH - top)
  o = jnp.einsum("bjh,bjhc->bhc", w, o_BxJxHxC) / jnp.sum(w, axis=1)[..., None]
  return o.astype(dtype)


def mma(acc, a, b, interpret: bool):
  """acc + a @ b on the warp-level MMA; in the GPU interpreter (which has no `mma`) as a
  float32 dot of the same operands."""
  if interpret:
    return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)
  return plgpu.mma(acc, a, b)


IMPLS = ("wgmma", "mma")


@functools.partial(jax.jit, static_argnames=("scale", "splits", "interpret", "row_pad",
                                             "early_fetch", "impl", "ring", "pdl", "_ablate"))
def mla_decode(q_lat_BxHxC, q_rope_BxHxR, latent_BxSxC, k_rope_BxSxR, lengths_B, *,
               scale: float, splits: int | None = None, interpret: bool = False,
               row_pad: int = ROW_PAD, early_fetch: bool = True, impl: str = "wgmma",
               ring: int | None = None, pdl: bool = False, _ablate: str = ""):
  """o_lat [B, H, C] (see the module docstring); lengths_B: visible slots per row (>= 1);
  splits: CTAs a row (None: `default_splits`). interpret: run in the GPU interpreter (on
  CPU; the MMAs as dots), to test everything but the MMA instruction itself. row_pad: 8
  (the latent's SMEM rows padded against bank conflicts) or 0 (unpadded, for comparison).
  early_fetch: the copy of step t+buffers-1 is issued when step t starts (after a
  warpgroup barrier), so it has the whole step to land; False: after the step's scores (the
  first version: half a step). impl: "wgmma" (the default: `_mla_decode_wgmma`, the
  products transposed on the warpgroup MMA, operands straight from SMEM) or "mma" (the
  warp-level MMA form above; row_pad and early_fetch apply to it only). ring: wgmma's
  copy ring in boxes of 8 KB (None: RING_BOXES; at least a step's 9). pdl (wgmma):
  launched with programmatic dependent launch: the kernel may start while the kernels
  before it (the query's products, the cache writes) finish; until its
  `griddepcontrol_wait` it only prefetches its first step's cache blocks into L2 (a
  prefetch reads nothing into the kernel: whatever those kernels still write reaches L2,
  where the loads after the wait find it), then lets the kernel after it launch.
  _ablate (wgmma; benchmarks only, a wrong result): "no_scores", "no_pv", "no_max" (the
  running max not reduced across the warpgroup) or "no_compute" (the copies and their
  waits alone) skip that part, to see what binds a step."""
  B, H, C = q_lat_BxHxC.shape
  S, R = latent_BxSxC.shape[1], k_rope_BxSxR.shape[2]
  dt = latent_BxSxC.dtype
  reason = unsupported_reason(H, C, R, S, dt)
  if reason:
    raise ValueError(reason)
  J = default_splits(B, S) if splits is None else splits
  if not 1 <= J <= S // SLOTS:
    raise ValueError(f"mla_decode kernel: splits must be 1..{S // SLOTS} (steps of {SLOTS} "
                     f"slots in {S}), got {J}")
  if impl not in IMPLS:
    raise ValueError(f"mla_decode kernel: impl must be one of {IMPLS}, got {impl!r}")
  if _ablate not in ("", "no_scores", "no_pv", "no_max", "no_compute"):
    raise ValueError(f"mla_decode kernel: unknown _ablate={_ablate!r}")
  if impl == "mma" and (ring is not None or _ablate or pdl):
    raise ValueError("mla_decode kernel: ring, pdl and _ablate apply to impl='wgmma' only")
  if impl == "wgmma":
    return _mla_decode_wgmma(q_lat_BxHxC, q_rope_BxHxR, latent_BxSxC, k_rope_BxSxR,
                             lengths_B, scale=scale, J=J, ring=ring, interpret=interpret,
                             pdl=bool(pdl), ablate=_ablate)
  if row_pad not in (0, 8):
    raise ValueError(f"mla_decode kernel: row_pad must be 0 or 8, got {row_pad}")
  per_split = -(-(S // SLOTS) // J)  # steps a split
  box_cols = CHUNK + row_pad
  buffers = 2 if row_pad else 3  # ring slots of a step's blocks in SMEM
  boxes = C // CHUNK  # one TMA box a 64-column chunk; its first column in the row:
  starts = [min(c * CHUNK, C - box_cols) for c in range(boxes)]
  lhs = plgpu.Layout.MMA_LHS(dt, m_warps=1)
  rhs = plgpu.Layout.MMA_RHS(dt, m_warps=1)
  acc = plgpu.Layout.MMA_ACC(dt, m_warps=1)
  row = acc.reduce(1)
  log2e = math.log2(math.e)

  def zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), acc)

  def across(v_H, cols):  # a per-head value as an [H, cols] accumulator-layout tile
    return plgpu.layout_cast(lax.broadcast_in_dim(v_H, (H, cols), (0,)), acc)

  def kernel(ql_ref, qr_ref, lat_ref, kr_ref, len_ref, *refs):
    o_ref, lse_ref = refs[:2] if J > 1 else (refs[0], None)
    p_smem, lat_smem, kr_smem, bars = refs[-4:]
    b, j = lax.axis_index("b"), lax.axis_index("split")
    visible = jnp.minimum(len_ref[b], S)  # slots 0..visible-1 of this row's cache
    first = j * per_split  # this split's steps: first .. first+count-1
    count = jnp.clip((visible + SLOTS - 1) // SLOTS - first, 0, per_split)

    def fetch(t):  # step first+t's blocks into ring slot t % buffers
      slots, buf = pl.ds((first + t) * SLOTS, SLOTS), t % buffers
      for c in range(boxes):
        plgpu.copy_gmem_to_smem(lat_ref.at[b, slots, pl.ds(starts[c], box_cols)],
                                lat_smem.at[buf, c], bars.at[buf])
      plgpu.copy_gmem_to_smem(kr_ref.at[b, slots], kr_smem.at[buf], bars.at[buf])

    for t in range(buffers - 1):  # the ring's first slots (its last is filled in step 0)
      @pl.when(t < count)
      def _():
        fetch(t)

    q_chunks = [plgpu.load(ql_ref.at[b, :, pl.ds(c * CHUNK, CHUNK)], layout=lhs,
                           optimized=False) for c in range(C // CHUNK)]
    q_chunks += [plgpu.load(qr_ref.at[b, :, pl.ds(c * CHUNK, CHUNK)], layout=lhs,
                            optimized=False) for c in range(R // CHUNK)]

    def step(t, carry):
      outs, m_run, l_run = carry
      buf = t % buffers
      if early_fetch:
        plgpu.commit_smem()  # a warpgroup barrier: every thread is done with step t-1's slot

        @pl.when(t + buffers - 1 < count)
        def _():
          fetch(t + buffers - 1)

      plgpu.barrier_wait(bars.at[buf])
      chunk = lambda c: lat_smem.at[buf, c, :, pl.ds(c * CHUNK - starts[c], CHUNK)]  # noqa: E731
      s = zeros((H, SLOTS))
      for c in range(boxes):  # scores: q_lat . latent (B operand: the block transposed)
        k = plgpu.load(chunk(c).T, layout=rhs, optimized=False)
        s = mma(s, q_chunks[c], k, interpret)
      for c in range(R // CHUNK):  # + q_rope . k_rope
        k = plgpu.load(kr_smem.at[buf, :, pl.ds(c * CHUNK, CHUNK)].T, layout=rhs,
                       optimized=False)
        s = mma(s, q_chunks[C // CHUNK + c], k, interpret)
      slot = plgpu.broadcasted_iota(jnp.int32, (H, SLOTS), 1, layout=acc) + (first + t) * SLOTS
      s = jnp.where(slot < visible, s * (scale * log2e), -jnp.inf)  # base 2 from here
      m_new = jnp.maximum(m_run, plgpu.layout_cast(s.max(axis=1), row))
      m_safe = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
      alpha = jnp.exp2(m_run - m_safe)
      p = jnp.exp2(s - across(m_safe, SLOTS))
      l_new = l_run * alpha + plgpu.layout_cast(p.sum(axis=1), row)
      # Pallas puts a warpgroup barrier before this store (auto_barriers: earlier reads of
      # p_smem done), so every thread has also finished step t-1, whose ring slot the late
      # copy below overwrites with step t+buffers-1.
      p_smem[:, pl.ds(0, SLOTS)] = p.astype(dt)
      if not early_fetch:
        @pl.when(t + buffers - 1 < count)
        def _():
          fetch(t + buffers - 1)

      p_lhs = plgpu.load(p_smem.at[:, pl.ds(0, SLOTS)], layout=lhs, optimized=False)
      new_outs = []
      for i, o in enumerate(outs):  # o_i += P . latent[:, i-th 64 columns] (as stored)
        v = plgpu.load(chunk(i), layout=rhs, optimized=False)
        new_outs.append(mma(o * across(alpha, CHUNK), p_lhs, v, interpret))
      return tuple(new_outs), m_new, l_new

    init = (tuple(zeros((H, CHUNK)) for _ in range(boxes)),
            plgpu.layout_cast(jnp.full((H,), -jnp.inf, jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((H,), jnp.float32), row))
    outs, m_run, l_run = lax.fori_loop(0, count, step, init)
    inv = across(1.0 / jnp.maximum(l_run, 1e-30), CHUNK)  # a split with no slot: o = 0
    for i, o in enumerate(outs):
      cols = pl.ds(i * CHUNK, CHUNK)
      if J == 1:
        o_ref[b, :, cols] = (o * inv).astype(dt)
      else:
        o_ref[b, j, :, cols] = o * inv
    if J > 1:  # log2-sum-exp2 of the split's scores, as an [H, 64] tile (column 0 read)
      lse_ref[b, j] = across(m_run + jnp.log2(l_run), CHUNK)

  if J == 1:
    out_type = jax.ShapeDtypeStruct((B, H, C), dt)
  else:
    out_type = (jax.ShapeDtypeStruct((B, J, H, C), jnp.float32),
                jax.ShapeDtypeStruct((B, J, H, CHUNK), jnp.float32))
  out = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(B, J), grid_names=("b", "split"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      scratch_types=[plgpu.SMEM((H, SLOTS + 8), dt),
                     plgpu.SMEM((buffers, boxes, SLOTS, box_cols), dt),
                     plgpu.SMEM((buffers, SLOTS, R), dt),
                     plgpu.Barrier(num_arrivals=boxes + 1, num_barriers=buffers)],
  )(q_lat_BxHxC, q_rope_BxHxR, latent_BxSxC, k_rope_BxSxR, lengths_B.astype(jnp.int32))
  if J == 1:
    return out
  o_parts, lse_parts = out
  return combine_splits(o_parts, lse_parts[..., 0], dt)


def _mla_decode_wgmma(q_lat_BxHxC, q_rope_BxHxR, latent_BxSxC, k_rope_BxSxR, lengths_B, *,
                      scale: float, J: int, ring: int | None, interpret: bool,
                      pdl: bool = False, ablate: str = ""):
  """`mla_decode` on the warpgroup MMA (wgmma), both products transposed so that the 16
  heads are the N dimension (wgmma takes N = 16; M is 64 rows, which 16 heads would pad
  4x) and every operand is read from SMEM by the tensor cores, with no register loads:

      scores^T [64 slots, H] = latent block [64, C] @ q_lat^T [C, H] + k_rope block @ q_rope^T
      o^T [C, H] += latent block^T [C, 64] @ P^T [64, H]      (A read transposed from SMEM)

  The per-head softmax statistics are column reductions of scores^T: the running max is
  reduced across the warpgroup each step (the rescale of o^T must agree in every warp);
  the running sum stays an elementwise [64, H] accumulator, reduced once at the end. P is
  stored transposed into SMEM ([H, 64], K-major for the PV product).

  The copies: a step's blocks are 9 boxes of [64 slots, 64 columns] (8 KB: the latent's 8
  column chunks and the rope key), each its own TMA copy and barrier, in a ring of `ring`
  boxes (RING_BOXES = 18, two steps; up to 25 fit in SMEM). When step t starts, step t-1's
  products are done with its 9 boxes, which take the next 9 boxes of this CTA's sequence,
  and each box's product is issued as soon as it lands. What binds it (twelfth session,
  benchmarks/notes_generate.md): the copies alone (`_ablate="no_compute"`) take ~90% of
  the kernel's time and stream at ~55% of 4.8 TB/s whatever the ring (9, 18 or 24 boxes),
  the order of a row's steps or the cache's layout (contiguous 8 KB tiles: no faster):
  what any plain read of a layer's cache reaches on the H200, by TMA or by XLA
  (`benchmarks/tma_stream.py`).
  o^T is 8 accumulators of [64, H], one a latent chunk (a box is the A operand of its
  chunk's product). The output o [H, C] goes out through SMEM (the query's buffer, free by
  then) and TMA; with splits, the float32 partial o^T [C, H] and log2-sum-exp2 go to GMEM
  directly."""
  B, H, C = q_lat_BxHxC.shape
  S, R = latent_BxSxC.shape[1], k_rope_BxSxR.shape[2]
  dt = latent_BxSxC.dtype
  f32 = jnp.float32
  per_split = -(-(S // SLOTS) // J)  # steps a split
  chunks = C // CHUNK  # latent boxes a step
  nbox = chunks + R // CHUNK  # boxes a step (the rope key's last)
  ring = min(RING_BOXES if ring is None else ring, nbox * per_split)
  if ring < nbox:
    raise ValueError(f"mla_decode kernel: ring must hold a step's {nbox} boxes, got {ring}")
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  wg = plgpu.Layout.WGMMA
  col = wg.reduce(0)  # a per-head vector (a column of an [rows, H] tile)
  log2e = math.log2(math.e)
  T = lambda ref: ref.transpose((1, 0))  # noqa: E731

  def across(v_H, rows):  # a per-head vector as an [rows, H] WGMMA-layout tile
    return lax.broadcast_in_dim(v_H, (rows, H), (1,))

  def kernel(ql_ref, qr_ref, lat_ref, kr_ref, len_ref, *refs):
    o_ref, lse_ref = refs[:2] if J > 1 else (refs[0], None)
    q_smem, qr_smem, box_smem, p_smem, bars, q_bar = refs[-6:]
    b, j = lax.axis_index("b"), lax.axis_index("split")
    if pdl and not interpret:  # before the wait: L2 prefetches only (no kernel input read)
      slots0 = pl.ds(jnp.minimum(j * per_split, S // SLOTS - 1) * SLOTS, SLOTS)  # in range
      for c in range(nbox):
        plgpu.async_prefetch(lat_ref.at[b, slots0, pl.ds(c * CHUNK, CHUNK)] if c < chunks
                             else kr_ref.at[b, slots0, pl.ds((c - chunks) * CHUNK, CHUNK)])
      plgpu.griddepcontrol_wait()
      plgpu.griddepcontrol_launch_dependents()
    visible = jnp.minimum(len_ref[b], S)  # slots 0..visible-1 of this row's cache
    first = j * per_split  # this split's steps: first .. first+count-1
    count = jnp.clip((visible + SLOTS - 1) // SLOTS - first, 0, per_split)

    def fetch(t, c):  # box c of step first+t (t dynamic, c static) into its ring slot
      slot = (nbox * t + c) % ring

      @pl.when(t < count)
      def _():
        slots = pl.ds((first + t) * SLOTS, SLOTS)
        src = (lat_ref.at[b, slots, pl.ds(c * CHUNK, CHUNK)] if c < chunks
               else kr_ref.at[b, slots, pl.ds((c - chunks) * CHUNK, CHUNK)])
        plgpu.copy_gmem_to_smem(src, box_smem.at[slot], bars.at[slot])

    plgpu.copy_gmem_to_smem(ql_ref.at[b], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(qr_ref.at[b], qr_smem, q_bar)
    for g in range(ring - nbox):  # the ring's first boxes; the rest come in step 0
      fetch(g // nbox, g % nbox)
    plgpu.barrier_wait(q_bar)
    q_chunk = lambda c: (q_smem.at[:, pl.ds(c * CHUNK, CHUNK)] if c < chunks  # noqa: E731
                         else qr_smem.at[:, pl.ds((c - chunks) * CHUNK, CHUNK)])

    def step(t, carry):
      oT, m_run, l_acc = carry
      plgpu.commit_smem()  # a warpgroup barrier: every warp is past step t-1's products
      for i in range(nbox):  # the boxes step t-1 freed take boxes ring-nbox.. ring-1 on
        g = ring - nbox + i
        fetch(t + g // nbox, g % nbox)
      box = lambda c: box_smem.at[(nbox * t + c) % ring]  # noqa: E731
      if ablate == "no_compute":
        for c in range(nbox):
          plgpu.barrier_wait(bars.at[(nbox * t + c) % ring])
        return oT, m_run, l_acc
      if ablate == "no_scores":
        for c in range(nbox):
          plgpu.barrier_wait(bars.at[(nbox * t + c) % ring])
        sT = plgpu.layout_cast(jnp.zeros((SLOTS, H), f32), wg)
      elif interpret:  # the interpreter has no accumulators to read back: dots
        sT = jnp.zeros((SLOTS, H), f32)
        for c in range(nbox):
          plgpu.barrier_wait(bars.at[(nbox * t + c) % ring])
          sT += jnp.dot(box(c)[...], q_chunk(c)[...].T, preferred_element_type=f32)
      else:
        def scores(acc):
          for c in range(nbox):  # each box's product issued as soon as it has landed
            plgpu.barrier_wait(bars.at[(nbox * t + c) % ring])
            plgpu.wgmma(acc, box(c), T(q_chunk(c)))
          return acc[...]
        sT = pl.run_scoped(scores, plgpu.ACC((SLOTS, H), f32))
      slot = plgpu.broadcasted_iota(jnp.int32, (SLOTS, H), 0, layout=wg) + (first + t) * SLOTS
      sT = jnp.where(slot < visible, sT * (scale * log2e), -jnp.inf)  # base 2 from here
      m_new = (jnp.maximum(m_run, sT.max(axis=0)) if ablate != "no_max"
               else plgpu.layout_cast(jnp.zeros((H,), f32), col))
      m_safe = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
      alpha = jnp.exp2(m_run - m_safe)
      pT = jnp.exp2(sT - across(m_safe, SLOTS))
      l_acc = l_acc * across(alpha, SLOTS) + pT
      oT = tuple(o * across(alpha, CHUNK) for o in oT)
      if interpret:
        p_smem[...] = pT.astype(dt).T
        oT = tuple(o + jnp.dot(box(c)[...].T, p_smem[...].T, preferred_element_type=f32)
                   for c, o in enumerate(oT))
      elif ablate != "no_pv":
        T(p_smem)[...] = pT.astype(dt)  # P [H, 64]: the K-major B operand of P x latent
        plgpu.commit_smem()

        def pv(accs):
          for c, acc in enumerate(accs):
            plgpu.wgmma(acc, T(box(c)), T(p_smem))
        oT = pl.run_state(pv)(tuple(plgpu.ACC.init(o) for o in oT))
      return oT, m_new, l_acc

    init = (tuple(plgpu.layout_cast(jnp.zeros((CHUNK, H), f32), wg) for _ in range(chunks)),
            plgpu.layout_cast(jnp.full((H,), -jnp.inf, f32), col),
            plgpu.layout_cast(jnp.zeros((SLOTS, H), f32), wg))
    oT, m_run, l_acc = lax.fori_loop(0, count, step, init)
    l_run = l_acc.sum(axis=0)
    inv = across(1.0 / jnp.maximum(l_run, 1e-30), CHUNK)  # a split with no slot: o = 0
    for c, o in enumerate(oT):
      cols = pl.ds(c * CHUNK, CHUNK)
      if J == 1:  # o [H, C] through the query's SMEM (its last reader, step count-1, is done)
        if interpret:
          q_smem[:, cols] = (o * inv).astype(dt).T
        else:
          T(q_smem.at[:, cols])[...] = (o * inv).astype(dt)
      else:
        o_ref[b, j, cols, :] = o * inv
    if J == 1:
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b])
      plgpu.wait_smem_to_gmem(0)
    else:
      lse_ref[b, j] = across(m_run + jnp.log2(l_run), SLOTS)  # row 0 read

  if J == 1:
    out_type = jax.ShapeDtypeStruct((B, H, C), dt)
  else:
    out_type = (jax.ShapeDtypeStruct((B, J, C, H), f32),
                jax.ShapeDtypeStruct((B, J, SLOTS, H), f32))
  out = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(B, J), grid_names=("b", "split"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      scratch_types=[plgpu.SMEM((H, C), dt, transforms=transforms),
                     plgpu.SMEM((H, R), dt, transforms=transforms),
                     plgpu.SMEM((ring, SLOTS, CHUNK), dt, transforms=transforms),
                     plgpu.SMEM((H, SLOTS), dt, transforms=transforms),
                     plgpu.Barrier(num_barriers=ring),
                     plgpu.Barrier(num_arrivals=2)],
  )(q_lat_BxHxC, q_rope_BxHxR, latent_BxSxC, k_rope_BxSxR, lengths_B.astype(jnp.int32))
  if J == 1:
    return out
  oT_parts, lse_parts = out
  return combine_splits(jnp.swapaxes(oT_parts, 2, 3), lse_parts[:, :, 0], dt)
