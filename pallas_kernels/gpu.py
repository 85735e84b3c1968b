"""Mosaic GPU kernels (NVIDIA Hopper: wgmma, pipelined TMA copies), persistent over the SMs.

One code path serves every group width, for compile cost: the first version gave every
group's weights their own kernel operand and every kernel one `pl.when` branch per group,
each with its own pipeline, epilogue and ladder of TMA stores, so the MoHGE-3B layer (8
groups) lowered ~7× the code of this version (326k vs 45k Mosaic GPU ops for fwd+bwd;
22 s lower + 49 s compile on the H200). Now:

- Weights are *stacked* into one 2-D operand per call (`stack_weights`): the experts'
  matrices [P_g, Q_g] one below the other ([ΣP, Q]) when all Q are equal (w_down
  [N, W_g, d] → [ΣW, d]: reshapes and a concat), else side by side ([P, ΣQ]) when all P
  are equal (w_gate_up [N, d, 2W_g] → [d, Σ2W]: a copy moving contiguous rows of 2W_g).
  A work item reads its expert's block offset and K-loop length at run time (Mosaic
  GPU's `emit_pipeline` takes a traced grid length). Widths and d are multiples of the
  tile edges, so every offset is a whole number of blocks and TMA block indices stay
  integral. Cost: a memory-bound copy of the bf16 weights (0.33 GB for MoHGE-3B, read
  and written once per fwd+bwd: the backward's stacking is the same HLO as the
  forward's and XLA CSEs it; ≈ 0.65 GB of traffic, benchmarks/kernel_compile.py times
  it). In the model, which casts float32 parameters to bf16 right before the layer, XLA
  fuses the stacking into that cast.
- hgmm: a flat work list of (row item, column tile) pairs is built from the group sizes
  at run time (metadata.py), with each pair's weight block offsets, K-loop length and
  output column block (one int32 row per pair); each SM walks it with stride #SMs. An
  item computes a (bm × bn) tile over its row tile with a TMA/wgmma pipeline along K,
  then stores only its own rows: TMA stores of 2^i rows (a "ladder" of static sizes at
  run-time offsets: a TMA box has a static shape). Rows past sum(group_sizes) are written
  as zeros by items of a padding pseudo-expert, which run no K steps (unless
  `Config.zero_padding` is False: then they are left unwritten).
- tgmm (weight gradient): a static list of (expert, K tile, F tile) items over all
  groups; an item finds its group with a few scalar selects over the groups' static item
  offsets (as jax's ragged_dot_mgpu example finds its group), its rows from run-time
  tables. It writes each group's gradient array directly ([N·K_g, F_g], reshaped for
  free to [N, K_g, F_g]), so no copy follows: one TMA store per group is the only
  per-group code left.
- Every kernel entry is wrapped in `jax.jit`: identical calls (e.g. the layers of a model
  that does not scan) share one trace and one lowering of each kernel.

Epilogues: "plain"; "swiglu" (the up projection: gate and up tiles in two accumulators,
h = silu(gate)·up written, and gate/up saved for the backward pass when asked);
"swiglu_bwd" (dh = dy·Wdᵀ; gate/up tiles are loaded and d[gate | up] written).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import metadata
from pallas_kernels.ffn import Ops


@dataclasses.dataclass(frozen=True)
class Config:
  bm: int = 128          # rows per tile
  bn: int = 128          # output columns per tile
  bn_up: int = 64        # ... for the fused up projection (two accumulators: gate, up)
  bk: int = 64           # contraction step
  steps: int = 4         # pipeline depth (max concurrent TMA steps)
  # weight-gradient kernel: output tile (bm_t × bn_t), contraction over bt rows a step
  bm_t: int = 128
  bn_t: int = 128
  bt: int = 64
  steps_t: int = 4
  num_sms: int | None = None
  interpret: bool = False
  # False: rows past sum(group_sizes) are left unwritten (undefined) instead of zeroed by
  # the padding pseudo-expert's items. For callers whose buffers are mostly padding (expert
  # parallelism's dropless receive buffers: half padding at EP 2) and which mask those
  # rows themselves (expert_parallel._local_ffn).
  zero_padding: bool = True


def unsupported_reason(widths, d_model, cfg: Config = Config()) -> str | None:
  """Why these shapes cannot run with `cfg`'s tiles (None when they can): every width W_g
  and d must be a multiple of every tile edge they meet (rows/columns of the up, down, dh
  and weight-gradient kernels)."""
  unit = math.lcm(cfg.bn, cfg.bn_up, cfg.bk, cfg.bm_t, cfg.bn_t)
  bad = [w for w in widths if w % unit]
  if bad or d_model % unit:
    return (f"the Mosaic GPU kernels need expert widths and d_model to be multiples of "
            f"{unit}; got widths {list(widths)}, d_model {d_model}")
  return None


def _num_sms(cfg):
  if cfg.num_sms:
    return cfg.num_sms
  if cfg.interpret:
    return 2
  return getattr(jax.devices()[0], "core_count", 132) or 132


def _params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _kernel(body, out_type, cfg, scratch_types=()):
  return plgpu.kernel(body, out_type=out_type, grid=(_num_sms(cfg),), grid_names=("sm",),
                      compiler_params=_params(), scratch_types=scratch_types,
                      interpret=plgpu.InterpretGPUParams() if cfg.interpret else None)


# ------------------------------------------------------------------------ stacked weights


@dataclasses.dataclass(frozen=True)
class Stacking:
  """How per-group weights [N, P_g, Q_g] sit in one 2-D matrix (static, hashable).

  by_rows: [ΣP, Q], expert e's block at rows [row0_e, row0_e + P_e); else [P, ΣQ], at
  columns [col0_e, col0_e + Q_e). Experts in global (group-major) order.
  """
  n: int
  shapes: tuple[tuple[int, int], ...]   # per group (P_g, Q_g)
  by_rows: bool

  @staticmethod
  def of(shapes_G):
    """shapes_G: per group (N, P_g, Q_g)."""
    n = shapes_G[0][0]
    pq = tuple((int(p), int(q)) for _, p, q in shapes_G)
    if len({q for _, q in pq}) == 1:
      return Stacking(n, pq, True)
    if len({p for p, _ in pq}) == 1:
      return Stacking(n, pq, False)
    raise ValueError(f"cannot stack weights of shapes {list(shapes_G)}: need equal rows or "
                     f"equal columns across groups")

  def offsets(self):
    """numpy int [E]: element offset of each expert's block along the stacked axis."""
    sizes = [(p if self.by_rows else q) for p, q in self.shapes for _ in range(self.n)]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def stack_weights(ws):
  """Per-group weights (G arrays [N, P_g, Q_g]) → (2-D matrix, Stacking)."""
  st = Stacking.of([w.shape for w in ws])
  if st.by_rows:
    parts = [w.reshape(-1, w.shape[2]) for w in ws]
    flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
  else:
    parts = [jnp.transpose(w, (1, 0, 2)).reshape(w.shape[1], -1) for w in ws]
    flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
  return flat, st


def flatten_weights(w_gate_up, w_down):
  """The stacked operands expert_ffn's kernels read (for timing the stacking alone)."""
  return stack_weights(w_gate_up)[0], stack_weights(w_down)[0]


# ---------------------------------------------------------------------------------- hgmm


def _store_rows(o_smem, out_gmem, row0, nrows, tile_row0, col_slice, bm):
  """TMA-store rows [row0, row0 + nrows) of a tile whose first row is tile_row0.

  A TMA box has a static shape, so a run-time row count is stored as a ladder of 2^i-row
  boxes (i = log2(bm) … 0) at run-time offsets, each issued when bit i of nrows is set.
  """
  start = row0 - tile_row0
  size = bm
  while size >= 1:
    @pl.when((nrows & size) != 0)
    def _(size=size, start=start):
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, size)],
                              out_gmem.at[pl.ds(tile_row0 + start, size), col_slice])
    start = start + (nrows & size)
    size //= 2


def _sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def _hgmm_work(group_sizes, m, bm, num_groups, per_expert, out_half_blocks,
               zero_padding=True):
  """The work table [bound, 8] (run-time) and its number of live rows [1].

  Work items are (row item, column tile) pairs, row items outer; a table row holds
  (row tile, first row, row count, K steps, the weight's first K block, its F block, its
  second F block (the up half of w_gate_up), output column block): the kernel reads a
  work item's scalars from one 32-byte row. per_expert: numpy int [E + 1, 6] (last row:
  the padding pseudo-expert) of (column tiles, K steps, first K block, first F block,
  second F block, gate-half column tiles of a split-layout output or 0). Rows of the
  table past the count repeat the last item. zero_padding=False: no padding items.
  """
  items = metadata.row_items(group_sizes, m, bm, num_groups, include_empty=False,
                             include_padding=zero_padding)
  t = items.bound
  pe = jnp.asarray(per_expert, jnp.int32)[items.expert]          # [T, 6]
  live = jnp.arange(t) < items.num_items
  ncols = jnp.where(live, pe[:, 0], 0)
  ends = jnp.cumsum(ncols)
  starts = ends - ncols
  bound = t * int(per_expert[:, 0].max())
  f = jnp.arange(bound, dtype=jnp.int32)
  it = jnp.minimum(jnp.searchsorted(ends, f, side="right"), t - 1)
  c = f - starts[it]
  pe = pe[it]
  half = pe[:, 5]
  cols = [items.tile[it], items.row_start[it], items.row_end[it] - items.row_start[it],
          pe[:, 1], pe[:, 2], pe[:, 3] + c, pe[:, 4] + c,
          jnp.where((half > 0) & (c >= half), c - half + out_half_blocks, c)]
  table = jnp.stack([a.astype(jnp.int32) for a in cols], axis=1)
  return table, ends[-1][None].astype(jnp.int32)


def hgmm(lhs, rhs, group_sizes, *, transpose_rhs=False, lhs_split=False, out_split=False,
         out_cols=None, epilogue="plain", gu=None, save_gu=False, cfg=Config()):
  """Row-ragged grouped matmul on Hopper; see reference.hgmm_ref. Returns a list of outputs.

  rhs: G per-group arrays (stacked here), or an already stacked (matrix, Stacking) pair.
  group_sizes: int32 [E], or a tuple of ints known when tracing (decoding's fixed slot
  blocks): the work table is then built while tracing, a constant of the program, instead
  of by ~50 small kernels a call (a searchsorted loop among them: at decode they cost
  more than the kernel).
  epilogue="swiglu": rhs is w_gate_up; returns h [M, Wmax] (and gu, split layout, when
  save_gu). epilogue="swiglu_bwd": rhs is w_down (transpose_rhs), gu is the saved
  split-layout gate/up; returns d[gate | up] (split layout).
  """
  if len(rhs) == 2 and isinstance(rhs[1], Stacking):
    flat, st = rhs
  else:
    flat, st = stack_weights(rhs)
  static_sizes = None
  if isinstance(group_sizes, tuple):
    static_sizes, group_sizes = tuple(int(g) for g in group_sizes), None
  return _hgmm(lhs, flat, group_sizes, gu, st=st, transpose_rhs=transpose_rhs,
               lhs_split=lhs_split, out_split=out_split, out_cols=out_cols,
               epilogue=epilogue, save_gu=save_gu, cfg=cfg, static_sizes=static_sizes)


@functools.partial(jax.jit, static_argnames=("st", "transpose_rhs", "lhs_split", "out_split",
                                             "out_cols", "epilogue", "save_gu", "cfg",
                                             "static_sizes"))
def _hgmm(lhs, rhs_flat, group_sizes, gu, *, st, transpose_rhs, lhs_split, out_split,
          out_cols, epilogue, save_gu, cfg, static_sizes=None):
  m, kl = lhs.shape
  dtype = lhs.dtype
  n, num_groups = st.n, len(st.shapes)
  if transpose_rhs:
    fs, ks = zip(*st.shapes)
  else:
    ks, fs = zip(*st.shapes)
  bm, bk, steps = cfg.bm, cfg.bk, cfg.steps
  bn = cfg.bn_up if epilogue == "swiglu" else cfg.bn
  if epilogue == "swiglu":
    wmax = max(fs) // 2
    out_cols = wmax
  elif epilogue == "swiglu_bwd":
    wmax = gu.shape[1] // 2
    out_cols = 2 * wmax
  elif out_cols is None:
    out_cols = max(fs)
  for f in fs:
    if f % bn or (epilogue == "swiglu" and (f // 2) % bn) or (out_split and (f // 2) % bn):
      raise ValueError(f"output width {f} is not a multiple of bn={bn}")
  for k in ks:
    if k % bk or (lhs_split and (k // 2) % bk):
      raise ValueError(f"contraction {k} is not a multiple of bk={bk}")

  # Per expert: where its weights start in the stacked matrix, in blocks of the axis they
  # are stacked along (K: the pipeline's step axis, or F: the output column axis).
  k_stacked = st.by_rows != transpose_rhs
  off = st.offsets()
  unit = bk if k_stacked else bn
  assert not (off % unit).any(), "stacked offsets must be whole blocks"
  per_expert = np.zeros((n * num_groups + 1, 6), np.int64)
  for e in range(n * num_groups):
    k, f = ks[e // n], fs[e // n]
    f_cols = f // 2 if epilogue == "swiglu" else f
    k0, f0 = (off[e] // bk, 0) if k_stacked else (0, off[e] // bn)
    per_expert[e] = (f_cols // bn, k // bk, k0, f0,
                     f0 + f_cols // bn if epilogue == "swiglu" else 0,
                     f // 2 // bn if out_split else 0)
  pad_cols = wmax // bn if epilogue in ("swiglu", "swiglu_bwd") else out_cols // bn
  per_expert[-1] = (pad_cols, 0, 0, 0, 0, 0)   # padding rows: no K steps → zeros
  if static_sizes is not None:
    with jax.ensure_compile_time_eval():  # concrete sizes: computed now, a constant table
      table, num_work = _hgmm_work(np.asarray(static_sizes, np.int32), m, bm, num_groups,
                                   per_expert, out_cols // 2 // bn, cfg.zero_padding)
  else:
    table, num_work = _hgmm_work(group_sizes, m, bm, num_groups, per_expert,
                                 out_cols // 2 // bn, cfg.zero_padding)
  # One K extent for all groups (the up projection and dh: K = d) → a static pipeline grid.
  static_nk = ks[0] // bk if len(set(ks)) == 1 else None
  kl_half_blocks = kl // 2 // bk
  rows_cap = min(bm, m)
  ladder_top = 1 << (rows_cap.bit_length() - 1)

  def body(nw_ref, work_ref, lhs_gmem, rhs_gmem, *refs):
    gu_gmem = None
    if epilogue == "swiglu_bwd":
      gu_gmem, refs = refs[0], refs[1:]
    out_gmems = refs

    @plgpu.nd_loop((nw_ref[0],), collective_axes="sm")
    def _loop(info):
      w = info.index[0]
      tile, rs, nrows, nk, k0, f0, f1, ob = (work_ref[w, i] for i in range(8))
      tile_row0 = tile * bm
      nkh = lax.div(nk, 2) if lhs_split else None  # K blocks of the gate half

      def store(vals_and_dests):
        """vals_and_dests: [(f32 value (bm, bn), out gmem, column block)]."""
        @functools.partial(pl.run_scoped,
                           o_smem=plgpu.SMEM((len(vals_and_dests), bm, bn), dtype))
        def _(o_smem):
          for i, (v, _, _) in enumerate(vals_and_dests):
            o_smem[i] = v.astype(dtype)
          plgpu.commit_smem()
          for i, (_, dst, cb) in enumerate(vals_and_dests):
            _store_rows(o_smem.at[i], dst, rs, nrows, tile_row0,
                        pl.ds(cb * bn, bn), ladder_top)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      def lhs_map(kk):
        if lhs_split:  # logical K = gate ‖ up of this group's width; physical split layout
          kk = jnp.where(kk < nkh, kk, kk + (kl_half_blocks - nkh))
        return tile, kk

      lhs_spec = plgpu.BlockSpec((bm, bk), lhs_map, delay_release=1)

      def rhs_spec(fb):
        if transpose_rhs:
          return plgpu.BlockSpec((bn, bk), lambda kk: (fb, k0 + kk), delay_release=1)
        return plgpu.BlockSpec((bk, bn), lambda kk: (k0 + kk, fb), delay_release=1)

      def mm(acc_ref, a, b):
        plgpu.wgmma(acc_ref, a, b.transpose((1, 0)) if transpose_rhs else b)

      def pipeline(step, in_specs, *gmems):
        # Padding items (nk = 0) skip the pipeline: their accumulators stay zero.
        @pl.when(nk > 0)
        def _():
          plgpu.emit_pipeline(step, grid=(static_nk if static_nk else nk,),
                              in_specs=in_specs, max_concurrent_steps=steps)(*gmems)

      if epilogue == "swiglu":
        def acc_scope(acc_g, acc_u):
          def step(_, a, bg, bu):
            mm(acc_g, a, bg)
            mm(acc_u, a, bu)
          pipeline(step, [lhs_spec, rhs_spec(f0), rhs_spec(f1)], lhs_gmem, rhs_gmem, rhs_gmem)
          return acc_g[...], acc_u[...]

        gate, up = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)), plgpu.ACC((bm, bn)))
        gate = gate.astype(dtype).astype(jnp.float32)
        up = up.astype(dtype).astype(jnp.float32)
        h = gate * _sigmoid(gate) * up
        dests = [(h, out_gmems[0], ob)]
        if save_gu:
          dests += [(gate, out_gmems[1], ob), (up, out_gmems[1], ob + wmax // bn)]
        store(dests)
        return

      def acc_scope(acc):
        pipeline(lambda _, a, b: mm(acc, a, b), [lhs_spec, rhs_spec(f0)], lhs_gmem, rhs_gmem)
        return acc[...]

      if epilogue == "swiglu_bwd":
        @functools.partial(pl.run_scoped, gu_smem=plgpu.SMEM((2, bm, bn), dtype),
                           bar=plgpu.Barrier(num_barriers=2))
        def _(gu_smem, bar):
          # gate/up tiles load by TMA while the main loop runs
          for i, cb in enumerate((ob, ob + wmax // bn)):
            plgpu.copy_gmem_to_smem(
                gu_gmem.at[pl.ds(tile_row0, bm), pl.ds(cb * bn, bn)],
                gu_smem.at[i], bar.at[i])
          # padding items: dh = 0 and their gate/up rows are zeros (the up kernel's
          # padding items wrote them), so d[gate | up] = 0 there
          dh = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))
          dh = dh.astype(dtype).astype(jnp.float32)
          plgpu.barrier_wait(bar.at[0])
          plgpu.barrier_wait(bar.at[1])
          gate = gu_smem[0].astype(jnp.float32)
          up = gu_smem[1].astype(jnp.float32)
          sig = _sigmoid(gate)
          dg = dh * up * sig * (1.0 + gate * (1.0 - sig))
          du = dh * gate * sig
          store([(dg, out_gmems[0], ob), (du, out_gmems[0], ob + wmax // bn)])
      else:
        store([(pl.run_scoped(acc_scope, plgpu.ACC((bm, bn))), out_gmems[0], ob)])

  if epilogue == "swiglu":
    out_type = [jax.ShapeDtypeStruct((m, wmax), dtype)]
    if save_gu:
      out_type.append(jax.ShapeDtypeStruct((m, 2 * wmax), dtype))
  else:
    out_type = [jax.ShapeDtypeStruct((m, out_cols), dtype)]
  extra = [gu] if epilogue == "swiglu_bwd" else []
  return _kernel(body, out_type, cfg)(num_work, table, lhs, rhs_flat, *extra)


# ---------------------------------------------------------------------------------- tgmm


def _pick(g, values):
  """values[g] for a run-time group index g and static ints: a chain of scalar selects."""
  out = jnp.int32(values[0])
  for i, v in enumerate(values[1:], 1):
    if v != values[0]:
      out = jnp.where(g == i, jnp.int32(v), out)
  return out


def tgmm(lhs, rhs, group_sizes, shapes, *, lhs_split=False, rhs_split=False, cfg=Config()):
  """Per-expert lhsᵀ·rhs over the expert's rows on Hopper; see reference.tgmm_ref."""
  return _tgmm(lhs, rhs, group_sizes, shapes=tuple(tuple(int(v) for v in s) for s in shapes),
               lhs_split=lhs_split, rhs_split=rhs_split, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("shapes", "lhs_split", "rhs_split", "cfg"))
def _tgmm(lhs, rhs, group_sizes, *, shapes, lhs_split, rhs_split, cfg):
  m, kl = lhs.shape
  _, fr = rhs.shape
  dtype = lhs.dtype
  num_groups = len(shapes)
  n = shapes[0][0]
  bm, bn, bt, steps = cfg.bm_t, cfg.bn_t, cfg.bt, cfg.steps_t
  ks = [s[1] for s in shapes]
  fs = [s[2] for s in shapes]
  for k, f in zip(ks, fs):
    if k % bm or f % bn or (lhs_split and (k // 2) % bm) or (rhs_split and (f // 2) % bn):
      raise ValueError(f"weight shape ({k}, {f}) does not tile by ({bm}, {bn})")
  kb = [k // bm for k in ks]
  fb = [f // bn for f in fs]
  # items: groups, then experts, then K tiles, then F tiles; offsets[g] = group g's first
  offsets = np.cumsum([0] + [n * a * b for a, b in zip(kb, fb)]).tolist()
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes).astype(jnp.int32)
  starts = (ends - sizes).astype(jnp.int32)
  lhs_half, rhs_half = kl // 2 // bm, fr // 2 // bn

  def transforms(cols):
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))

  def body(starts_ref, ends_ref, lhs_gmem, rhs_gmem, *out_gmems):
    @plgpu.nd_loop((offsets[-1],), collective_axes="sm")
    def _loop(info):
      f = info.index[0]
      g = jnp.int32(0)
      for gi in range(1, num_groups):
        g = jnp.where(f >= offsets[gi], jnp.int32(gi), g)
      kbg, fbg = _pick(g, kb), _pick(g, fb)
      q = f - _pick(g, offsets[:-1])
      e_local = lax.div(q, kbg * fbg)
      r = q - e_local * (kbg * fbg)
      i, j = lax.div(r, fbg), lax.rem(r, fbg)
      e = g * n + e_local
      s, en = starts_ref[e], ends_ref[e]
      b0 = lax.div(s, bt)
      nb = jnp.where(en > s, lax.div(en + bt - 1, bt) - b0, 0)
      ci = metadata.split_block(i, lax.div(kbg, 2), lhs_half) if lhs_split else i
      cj = metadata.split_block(j, lax.div(fbg, 2), rhs_half) if rhs_split else j

      def acc_scope(acc_ref):
        def step(idx, a_smem, b_smem):
          rb = idx[0]
          # rows of neighbouring experts in the first and last block are zeroed (a select:
          # a multiply would let NaN garbage through)
          for smem, cols in ((a_smem, bm), (b_smem, bn)):
            @pl.when((rb == 0) | (rb == nb - 1))
            def _(smem=smem, cols=cols):
              rows = (b0 + rb) * bt + plgpu.layout_cast(
                  lax.broadcasted_iota(jnp.int32, (bt, cols), 0), plgpu.Layout.WGMMA)
              keep = (rows >= s) & (rows < en)
              smem[...] = jnp.where(keep, smem[...], jnp.zeros_like(smem[...]))
              plgpu.commit_smem()
          plgpu.wgmma(acc_ref, a_smem.transpose((1, 0)), b_smem)

        @pl.when(nb > 0)
        def _():
          plgpu.emit_pipeline(
              step, grid=(nb,),
              in_specs=[
                  plgpu.BlockSpec((bt, bm), lambda rb: (b0 + rb, ci),
                                  delay_release=1, transforms=transforms(bm)),
                  plgpu.BlockSpec((bt, bn), lambda rb: (b0 + rb, cj),
                                  delay_release=1, transforms=transforms(bn)),
              ],
              max_concurrent_steps=steps)(lhs_gmem, rhs_gmem)
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))

      @functools.partial(pl.run_scoped,
                         o_smem=plgpu.SMEM((bm, bn), dtype, transforms=transforms(bn)))
      def _(o_smem):
        o_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        # each group's gradient is its own output [N·K_g, F_g]: one TMA store per group
        for gi in range(num_groups):
          @pl.when(g == gi)
          def _(gi=gi):
            plgpu.copy_smem_to_gmem(
                o_smem, out_gmems[gi].at[pl.ds((e_local * kb[gi] + i) * bm, bm),
                                         pl.ds(j * bn, bn)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_type = [jax.ShapeDtypeStruct((n * k, f), dtype) for k, f in zip(ks, fs)]
  outs = _kernel(body, out_type, cfg)(starts, ends, lhs, rhs)
  return tuple(o.reshape(n, k, f) for o, k, f in zip(outs, ks, fs))


class GpuOps(Ops):
  """Building blocks through the Mosaic GPU kernels (bf16 / f16 only; f32 → reference)."""

  name = "mosaic_gpu"

  def _cfg(self):
    return Config(**self.tuning)

  def _ok(self, x):
    return x.dtype in (jnp.bfloat16, jnp.float16)

  def hgmm(self, lhs, rhs, group_sizes, **kw):
    if not self._ok(lhs):
      return super().hgmm(lhs, rhs, group_sizes, **kw)
    return hgmm(lhs, rhs, group_sizes, cfg=self._cfg(), **kw)[0]

  def tgmm(self, lhs, rhs, group_sizes, shapes, **kw):
    if not self._ok(lhs):
      return super().tgmm(lhs, rhs, group_sizes, shapes, **kw)
    return tgmm(lhs, rhs, group_sizes, [tuple(s) for s in shapes], cfg=self._cfg(), **kw)

  def up(self, x_MxD, w_gate_up, group_sizes, *, save_gu):
    if not self._ok(x_MxD):
      return super().up(x_MxD, w_gate_up, group_sizes, save_gu=save_gu)
    outs = hgmm(x_MxD, w_gate_up, group_sizes, epilogue="swiglu", save_gu=save_gu,
                cfg=self._cfg())
    return outs[0], (outs[1] if save_gu else None)

  def down_bwd(self, dy_MxD, w_down, group_sizes, gu):
    if not self._ok(dy_MxD):
      return super().down_bwd(dy_MxD, w_down, group_sizes, gu)
    return hgmm(dy_MxD, w_down, group_sizes, transpose_rhs=True, epilogue="swiglu_bwd",
                gu=gu, cfg=self._cfg())[0]
