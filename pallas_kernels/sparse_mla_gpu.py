"""DSA sparse MLA attention in latent form as a Mosaic GPU (Hopper) kernel: the forward,
gathering each query's selected latent rows inside the kernel.

    o_lat, lse = sparse_mla_fwd(q_lat [B,T,H,C], q_rope [B,T,H,R], ckr [B,S,C+R], idx [B,T,K])

score[t, h, k] = scale · (q_lat[t, h] · c[idx[t, k]] + q_rope[t, h] · k_rope[idx[t, k]]),
softmax over the k with idx ≥ 0 (idx = -1 marks an invalid slot), o_lat[t, h] = Σ_k p c[idx].
lse[t, h] (natural log, float32) is saved for the backward. `sparse_attention.sparse_mla`
(impl="pallas") wraps it in a custom VJP whose backward is pure JAX (`_sparse_mla_bwd`).

Layout of the work (first version: correct, lowers at MoHGE-3B shapes, not tuned):
- Queries in sequence order (L2 reuse of the gathered rows between neighbours). Two
  halves of C per query (below), `split`: "warpgroup" (default) one CTA per query with two
  warpgroups sharing one gather (warpgroup 0 gathers step s+1 while warpgroup 1 still
  computes step s, handshake on barriers k_ready / k_consumed); "cta" two CTAs per query
  (grid 2·B·T, query-major), each gathering the keys itself (2x the TMA copies).
- wgmma needs M = 64 rows, a query has H = 16 heads: the heads are rows 0..H-1 of a
  [64, ·] tile, rows H..63 zero (4x wasted MMA at H = 16; rows are independent, so the
  padding never mixes into real rows). O [64, C] f32 would need 256 registers a thread,
  so a CTA produces one half of C (4 register tiles [64, 64]) and the score product
  S = q·kᵀ over C+R is computed by both halves (2x). Each step's P·V goes into a fresh
  wgmma accumulator added to the rescaled O (not `pl.run_state(ACC.init(O))`, which the
  GPU interpreter does not run), and P goes through SMEM (the interpreter takes wgmma
  operands from SMEM only). The alternatives (keys as M with Pᵀ [keys, H] as the B
  operand of P·V; two consumer warpgroups sharing S) are in benchmarks/notes_dsa.md.
- The latent tile is SMEM [(C+R)/w, 64 keys, w] (w = 128 bytes of columns: 64 bf16),
  one swizzled column tile per leading index, so the score is (C+R)/w wgmmas of K = w and
  each output accumulator reads one column tile as its B operand.
- Gather: per 64-key step, 64 one-row TMA copies (a run-time row each, read from an SMEM
  copy of the query's idx row) of `tiles_per_copy` column tiles into an untiled staging
  buffer, all arriving on one barrier (num_arrivals = 64); then registers → the swizzled
  tile (a one-row TMA straight into a tiled buffer is refused: tile rows are 8). The
  staging buffer must be explicitly unswizzled (tile (1, w), no swizzle): see `stage`. With
  split="cta" nothing overlaps (gather, wait, compute); two key tiles would not fit in SMEM.
  After the last step the key tile stages the output for its TMA store.
- SMEM (bf16, checked by the lowering: at most 232,448 bytes): q 72 KB, keys 72 KB,
  staging 8 KB a column tile per copy, P 8 KB per warpgroup, idx 8 KB; tiles_per_copy = 9
  does not fit (248,872 bytes with two warpgroups).
- Online softmax along the keys (rows = heads), invalid keys at -1e30 (as the reference:
  a query with no valid key gets the uniform average, here of row 0 of its sequence).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64       # wgmma M: the query's heads, zero-padded
KEYS = 64       # keys per step
_MASKED = -1e30  # as sparse_attention._MASKED


def _tile_cols(dtype) -> int:
  return 128 // jnp.dtype(dtype).itemsize


def unsupported_reason(H: int, C: int, R: int, K: int, dtype, tiles_per_copy: int = 1
                       ) -> str | None:
  """Why these shapes cannot run (None when they can)."""
  w = _tile_cols(dtype)
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    return f"sparse_mla kernel: dtype must be bfloat16 (or float32 in interpret mode), got {dtype}"
  if not (H % 8 == 0 and H <= ROWS):
    return f"sparse_mla kernel: heads must be a multiple of 8 and at most {ROWS}, got {H}"
  if C % (2 * w) or R % w:
    return (f"sparse_mla kernel: latent dim C must be a multiple of {2 * w} and rope dim R of "
            f"{w} for {jnp.dtype(dtype).name}; got C={C}, R={R}")
  if ((C + R) // w) % tiles_per_copy:
    return f"sparse_mla kernel: tiles_per_copy={tiles_per_copy} must divide {(C + R) // w}"
  if not 1 <= K <= 256 * KEYS:  # the idx row is one TMA box [K / 64, 64]
    return f"sparse_mla kernel: selected keys K must be between 1 and {256 * KEYS}, got {K}"
  return None


def _transforms(w):
  return (plgpu.TilingTransform((8, w)), plgpu.SwizzleTransform(128))


SPLITS = ("cta", "warpgroup")
# Debug modes for benchmarks/dsa_kernel_bisect.py (the default "full" path is unchanged):
#   "gather": also returns the gathered key rows, dbg [B,T,Kp,C+R] (q's dtype), stored from
#             the key tile after each step's gather (invalid slots: row 0 of the sequence);
#   "scores": also returns the scaled scores before masking, dbg [B,T,H,Kp] float32;
#   "probs":  no P·V (o = 0); also returns each step's p = exp(s - m_running) after masking,
#             dbg [B,T,H,Kp] float32 (the LSE is the kernel's own);
#   "copy_q": o = q_lat read back from the q tile (the q load and the output store path;
#             no third output).
MODES = ("full", "gather", "scores", "probs", "copy_q")


@functools.partial(jax.jit, static_argnames=("scale", "tiles_per_copy", "split", "interpret",
                                             "mode", "inferred_stage"))
def sparse_mla_fwd(q_lat_BxTxHxC, q_rope_BxTxHxR, ckr_BxSxCR, idx_BxTxK, *, scale: float,
                   tiles_per_copy: int | None = None, split: str = "warpgroup",
                   interpret: bool | plgpu.InterpretGPUParams = False, mode: str = "full",
                   inferred_stage: bool = False):
  """Returns o_lat [B,T,H,C] (q_lat's dtype) and lse [B,T,H] float32. idx: int32, -1 =
  invalid; K is padded to a multiple of 64 with -1. interpret: True (or the interpreter's
  parameters) runs the kernel in the GPU interpreter. tiles_per_copy: None = 3 when it
  divides the column tiles (9 at MoHGE-3B: 192 copies a step instead of 576; a guess until
  benchmarks/dsa.py has timed both), else 1.

  split: who computes the two halves of C. "cta": two CTAs per query, each gathering the
  keys itself. "warpgroup": one CTA per query with two warpgroups sharing one gather:
  warpgroup 0 gathers step s+1 once warpgroup 1 has consumed step s (barriers k_ready /
  k_consumed), both compute the scores, each its half of o.

  mode: "full" (the attention) or a debug mode of MODES ("gather", "scores", "probs"
  return a third output: (o_lat, lse, dbg)); see MODES. inferred_stage (debug only): the
  first version's staging buffer, transforms left to layout inference (wrong on a GPU
  with tiles_per_copy > 1, see `stage` below), to confirm that diagnosis."""
  B, T, H, C = q_lat_BxTxHxC.shape
  R = q_rope_BxTxHxR.shape[-1]
  S, CR = ckr_BxSxCR.shape[1:]
  K = idx_BxTxK.shape[-1]
  dt = q_lat_BxTxHxC.dtype
  if tiles_per_copy is None:
    tiles_per_copy = 3 if (CR // _tile_cols(dt)) % 3 == 0 else 1
  if reason := unsupported_reason(H, C, R, K, dt, tiles_per_copy):
    raise ValueError(reason)
  if split not in SPLITS:
    raise ValueError(f"sparse_mla kernel: split must be one of {SPLITS}, got {split!r}")
  if mode not in MODES:
    raise ValueError(f"sparse_mla kernel: mode must be one of {MODES}, got {mode!r}")
  assert CR == C + R and ckr_BxSxCR.dtype == dt and q_rope_BxTxHxR.dtype == dt
  by_wg = split == "warpgroup"
  w = _tile_cols(dt)
  n_tiles, n_lat, n_half = CR // w, C // w, C // (2 * w)
  copy_cols = tiles_per_copy * w
  Kp = -(-K // KEYS) * KEYS
  n_steps = Kp // KEYS
  # [N, steps, 64]: a TMA box is at most 256 long in every dimension
  idx_NxSTEPSx64 = jnp.pad(idx_BxTxK.reshape(B * T, K).astype(jnp.int32),
                           ((0, 0), (0, Kp - K)), constant_values=-1).reshape(B * T, -1, KEYS)

  dbg_s = mode in ("scores", "probs")  # a float32 [H, Kp] debug output per query

  def body(q_lat_gmem, q_rope_gmem, ckr_gmem, idx_gmem, o_gmem, lse_gmem, *rest):
    if mode in ("full", "copy_q"):
      dbg_gmem = None
    else:
      dbg_gmem, *rest = rest
    q_smem, k_smem, stage, p_smem, lse_smem, idx_smem, *rest = rest
    s_smem = rest.pop(0) if dbg_s else None
    bar_q, bar_k, *wg_bars = rest
    if by_wg:
      n, half = lax.axis_index("x"), lax.axis_index("wg")
      k_ready, k_consumed, done = wg_bars
      leader = pl.when(half == 0)  # warpgroup 0 loads q and gathers
    else:
      n, half = lax.axis_index("x") // 2, lax.axis_index("x") % 2
      leader = lambda f: f()  # noqa: E731
    p_tile = p_smem.at[half if by_wg else 0]
    row0 = (n // T) * S  # first latent row of this query's sequence in ckr [B·S, C+R]

    @leader
    def _():
      q_smem[...] = jnp.zeros(q_smem.shape, dt)  # padding rows H..63
      plgpu.commit_smem()
      for c in range(n_tiles):
        src = (q_lat_gmem.at[n, :, pl.ds(c * w, w)] if c < n_lat
               else q_rope_gmem.at[n, :, pl.ds((c - n_lat) * w, w)])
        plgpu.copy_gmem_to_smem(src, q_smem.at[c, pl.ds(0, H)], bar_q)
      plgpu.copy_gmem_to_smem(idx_gmem.at[n], idx_smem, bar_q)
    plgpu.barrier_wait(bar_q)

    def gather(step):
      """k_smem ← ckr rows idx[step, 0:64] (invalid → row 0)."""
      for g in range(n_tiles // tiles_per_copy):
        def issue(i, _):
          r = row0 + jnp.maximum(idx_smem[step, i], 0)
          plgpu.copy_gmem_to_smem(ckr_gmem.at[pl.ds(r, 1), pl.ds(g * copy_cols, copy_cols)],
                                  stage.at[pl.ds(i, 1)], bar_k)
        lax.fori_loop(0, KEYS, issue, None)
        plgpu.barrier_wait(bar_k)
        if by_wg and g == 0:  # warpgroup 1 is done reading the previous step
          pl.when(step > 0)(lambda: plgpu.barrier_wait(k_consumed))
        for t in range(tiles_per_copy):  # staging is unswizzled (see `stage` below)
          k_smem.at[g * tiles_per_copy + t][...] = (
              stage[:, pl.ds(t * w, w)] if inferred_stage else plgpu.load(
                  stage.at[:, pl.ds(t * w, w)], layout=plgpu.Layout.WGMMA, optimized=False))
        plgpu.commit_smem()  # the staging reads and tile writes before the next TMA / wgmma
      if mode == "gather":  # debug: the gathered rows out (read before any later overwrite)
        @pl.when(half == 0)
        def _():
          for c in range(n_tiles):
            plgpu.copy_smem_to_gmem(
                k_smem.at[c], dbg_gmem.at[n, pl.ds(step * KEYS, KEYS), pl.ds(c * w, w)])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      if by_wg:
        plgpu.barrier_arrive(k_ready)

    def kv_step(step, carry):
      o_acc, m_i, l_i = carry
      leader(lambda: gather(step))
      if by_wg:
        pl.when(half == 1)(lambda: plgpu.barrier_wait(k_ready))

      def qk(acc):
        for c in range(n_tiles):
          plgpu.wgmma(acc, q_smem.at[c], k_smem.at[c].transpose((1, 0)))
        return acc[...]
      s = pl.run_scoped(qk, plgpu.ACC((ROWS, KEYS), jnp.float32)) * scale

      def dbg_out(x):  # debug: x [ROWS, KEYS] float32, rows 0..H-1 → dbg[n, :, step keys]
        @pl.when(half == 0)
        def _():
          s_smem[...] = x
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(s_smem.at[pl.ds(0, H)],
                                  dbg_gmem.at[n, :, pl.ds(step * KEYS, KEYS)])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      if mode == "scores":
        dbg_out(s)
      ok = idx_smem[step] >= 0
      s = jnp.where(lax.broadcast_in_dim(ok, s.shape, [1]), s, _MASKED)
      m_new = jnp.maximum(m_i, s.max(axis=1))
      alpha = jnp.exp(m_i - m_new)
      p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l_i = l_i * alpha + p.sum(axis=1)
      if mode == "probs":
        dbg_out(p)
        if by_wg:
          pl.when((half == 1) & (step < n_steps - 1))(lambda: plgpu.barrier_arrive(k_consumed))
        return o_acc, m_new, l_i
      p_tile[...] = p.astype(dt)
      plgpu.commit_smem()

      def pv(d):  # p · (column tile d of this half of c), in a fresh accumulator
        def mm(acc):
          plgpu.wgmma(acc, p_tile, k_smem.at[half * n_half + d])
          return acc[...]
        return pl.run_scoped(mm, plgpu.ACC((ROWS, w), jnp.float32))
      o_acc = tuple(a * lax.broadcast_in_dim(alpha, a.shape, [0]) + pv(d)
                    for d, a in enumerate(o_acc))
      if by_wg:  # (after the last step, `done` below)
        pl.when((half == 1) & (step < n_steps - 1))(lambda: plgpu.barrier_arrive(k_consumed))
      return o_acc, m_new, l_i

    zeros = jnp.zeros((ROWS, w), jnp.float32)
    init = ((zeros,) * n_half, jnp.full((ROWS,), _MASKED, jnp.float32),
            jnp.zeros((ROWS,), jnp.float32))
    o_acc, m_i, l_i = lax.fori_loop(0, n_steps, kv_step, init)
    if by_wg:  # both warpgroups done with k_smem: its tiles stage the output
      plgpu.barrier_arrive(done)
      plgpu.barrier_wait(done)
    inv_l = 1.0 / l_i
    o_tiles = [half * n_half + d for d in range(n_half)]
    if mode == "copy_q":  # debug: o = q_lat from the q tile (o_acc and 1/l unused)
      o_acc = tuple(q_smem.at[t][...].astype(jnp.float32) for t in o_tiles)
      inv_l = jnp.ones_like(l_i)
    for t, a in zip(o_tiles, o_acc):
      k_smem.at[t][...] = (a * lax.broadcast_in_dim(inv_l, a.shape, [0])).astype(dt)
    plgpu.commit_smem()
    for t in o_tiles:
      plgpu.copy_smem_to_gmem(k_smem.at[t, pl.ds(0, H)], o_gmem.at[n, :, pl.ds(t * w, w)])

    @pl.when(half == 0)
    def _():
      lse_smem[...] = m_i + jnp.log(l_i)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, H)], lse_gmem.at[n])
    plgpu.wait_smem_to_gmem(0)

  wg = dict(num_threads=2, thread_name="wg") if by_wg else {}
  dbg_type = {"full": (), "copy_q": (),
              "gather": (jax.ShapeDtypeStruct((B * T, Kp, CR), dt),)}.get(
                  mode, (jax.ShapeDtypeStruct((B * T, H, Kp), jnp.float32),))
  f32_transforms = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
  kernel = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct((B * T, H, C), dt),
                jax.ShapeDtypeStruct((B * T, H), jnp.float32), *dbg_type),
      # query-major: in "cta", both halves of a query run together (L2)
      grid=((1 if by_wg else 2) * B * T,), grid_names=("x",), **wg,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None),
      scratch_types=[
          plgpu.SMEM((n_tiles, ROWS, w), dt, transforms=_transforms(w)),   # q, padded
          plgpu.SMEM((n_tiles, KEYS, w), dt, transforms=_transforms(w)),   # keys; then o
          # TMA staging, explicitly unswizzled. Left without transforms, warpgroup layout
          # inference gave it tile (1, w) + 128-byte swizzle: the one-row TMA writes
          # swizzle by SMEM address (row i, tile c of a copy: XOR group (i·tpc + c) mod 8),
          # while the register load of column tile t > 0 (a subview at a 128-byte offset)
          # swizzles relative to the subview (group i·tpc mod 8): with tiles_per_copy = 3
          # two of three column tiles of every key were scrambled on the GPU (the
          # interpreter ignores transforms).
          plgpu.SMEM((KEYS, copy_cols), dt,
                     transforms=() if inferred_stage else (plgpu.TilingTransform((1, w)),)),
          plgpu.SMEM((2 if by_wg else 1, ROWS, KEYS), dt,                  # P (wgmma A)
                     transforms=_transforms(w)),
          plgpu.SMEM((ROWS,), jnp.float32),                                # lse
          plgpu.SMEM((Kp // KEYS, KEYS), jnp.int32),                       # idx row
          *([plgpu.SMEM((ROWS, KEYS), jnp.float32, transforms=f32_transforms)]  # debug
            if dbg_s else []),
          plgpu.Barrier(num_arrivals=n_tiles + 1),
          plgpu.Barrier(num_arrivals=KEYS),
          *([plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(num_arrivals=2)] if by_wg else []),
      ])
  o_NxHxC, lse_NxH, *dbg = kernel(q_lat_BxTxHxC.reshape(B * T, H, C),
                                   q_rope_BxTxHxR.reshape(B * T, H, R),
                                   ckr_BxSxCR.reshape(B * S, CR), idx_NxSTEPSx64)
  out = o_NxHxC.reshape(B, T, H, C), lse_NxH.reshape(B, T, H)
  if not dbg:
    return out
  return *out, dbg[0].reshape(B, T, *dbg[0].shape[1:])
