"""Mosaic GPU kernels (NVIDIA Hopper: wgmma, pipelined TMA copies), persistent over the SMs.

hgmm: a flat work list of (row item, column tile) pairs is built from the group sizes at
run time (metadata.py); each SM walks it with stride #SMs. Every group's weights are
their own kernel operand, and each group's code path is specialised to its static
shapes (one `pl.when` branch per group), so there is no padding of narrow groups to the
widest and experts without rows have no work item. An item computes a (bm × bn) tile
over its row tile with a TMA/wgmma pipeline along K, then stores only its own rows:
TMA stores of 2^i rows (a "ladder" of static sizes at run-time offsets). Rows past
sum(group_sizes) are written as zeros by items of a padding pseudo-group.

Epilogues: "plain"; "swiglu" (the up projection: gate and up tiles in two accumulators,
h = silu(gate)·up written, and gate/up saved for the backward pass when asked);
"swiglu_bwd" (dh = dy·Wdᵀ; gate/up tiles are loaded and d[gate | up] written).

tgmm (weight gradient): a static list of (expert, K tile, F tile) items; each walks its
expert's row blocks (dynamic count) and masks the rows of neighbouring experts in the
first and last block.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
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


def unsupported_reason(widths, d_model, cfg: Config = Config()) -> str | None:
  """Why these shapes cannot run with `cfg`'s tiles (None when they can): every width W_g
  and d must be a multiple of every tile edge they meet (rows/columns of the up, down, dh
  and weight-gradient kernels)."""
  import math
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


def _store_rows(o_smem, out_gmem, row0, nrows, tile_row0, col_slice, bm):
  """TMA-store rows [row0, row0 + nrows) of a tile whose first row is tile_row0."""
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


def _flat_work(items, cols_per_group):
  """(row item, column tile) pairs, items outer. cols_per_group has G + 1 entries."""
  t = items.bound
  live = jnp.arange(t) < items.num_items
  ncols = jnp.where(live, jnp.asarray(cols_per_group, jnp.int32)[items.group], 0)
  ends = jnp.cumsum(ncols)
  starts = ends - ncols
  bound = t * max(cols_per_group)
  f = jnp.arange(bound, dtype=jnp.int32)
  it = jnp.minimum(jnp.searchsorted(ends, f, side="right"), t - 1)
  col = f - starts[it]
  take = lambda a: a[it].astype(jnp.int32)
  return (ends[-1][None].astype(jnp.int32), take(items.group), take(items.local),
          take(items.tile), take(items.row_start), take(items.row_end),
          col.astype(jnp.int32))


def hgmm(lhs, rhs, group_sizes, *, transpose_rhs=False, lhs_split=False, out_split=False,
         out_cols=None, epilogue="plain", gu=None, save_gu=False, cfg=Config()):
  """Row-ragged grouped matmul on Hopper; see reference.hgmm_ref.

  epilogue="swiglu": rhs is w_gate_up; returns h [M, Wmax] (and gu, split layout, when
  save_gu). epilogue="swiglu_bwd": rhs is w_down (transpose_rhs), gu is the saved
  split-layout gate/up; returns d[gate | up] (split layout).
  """
  m, kl = lhs.shape
  num_groups = len(rhs)
  dtype = lhs.dtype
  ks = [w.shape[2] if transpose_rhs else w.shape[1] for w in rhs]
  fs = [w.shape[1] if transpose_rhs else w.shape[2] for w in rhs]
  bm, bk, steps = cfg.bm, cfg.bk, cfg.steps
  bn = cfg.bn_up if epilogue == "swiglu" else cfg.bn
  if epilogue == "swiglu":
    widths = [f // 2 for f in fs]
    wmax = max(widths)
    ncol_g = [w // bn for w in widths]
    out_cols = wmax
  elif epilogue == "swiglu_bwd":
    wmax = gu.shape[1] // 2
    ncol_g = [f // bn for f in fs]
    out_cols = 2 * wmax
  else:
    if out_cols is None:
      out_cols = max(fs)
    ncol_g = [f // bn for f in fs]
  for f in fs:
    if f % bn or (epilogue == "swiglu" and (f // 2) % bn) or (out_split and (f // 2) % bn):
      raise ValueError(f"output width {f} is not a multiple of bn={bn}")
  for k in ks:
    if k % bk or (lhs_split and (k // 2) % bk):
      raise ValueError(f"contraction {k} is not a multiple of bk={bk}")
  pad_cols = out_cols // bn
  items = metadata.row_items(group_sizes, m, bm, num_groups, include_empty=False,
                             include_padding=True)
  work = _flat_work(items, ncol_g + [pad_cols])
  kl_half_blocks = kl // 2 // bk
  out_half_blocks = out_cols // 2 // bn
  rows_cap = min(bm, m)
  ladder_top = 1 << (rows_cap.bit_length() - 1)

  def body(nf_ref, grp_ref, loc_ref, tile_ref, rs_ref, re_ref, col_ref, lhs_gmem, *refs):
    rhs_gmems = refs[:num_groups]
    refs = refs[num_groups:]
    gu_gmem = None
    if epilogue == "swiglu_bwd":
      gu_gmem, refs = refs[0], refs[1:]
    out_gmems = refs

    @plgpu.nd_loop((nf_ref[0],), collective_axes="sm")
    def _loop(info):
      f = info.index[0]
      g = grp_ref[f]
      loc = loc_ref[f]
      tile = tile_ref[f]
      rs = rs_ref[f]
      nrows = re_ref[f] - rs
      c = col_ref[f]
      tile_row0 = tile * bm

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

      for gi in range(num_groups):
        nk = ks[gi] // bk
        nkh = nk // 2

        def lhs_map(kk, nkh=nkh):
          if lhs_split:
            kk = jnp.where(kk < nkh, kk, kk + (kl_half_blocks - nkh))
          return tile, kk

        @pl.when(g == gi)
        def _(gi=gi, nk=nk, lhs_map=lhs_map):
          w_ref = rhs_gmems[gi].at[loc]
          lhs_spec = plgpu.BlockSpec((bm, bk), lhs_map, delay_release=1)

          def rhs_spec(cb):
            if transpose_rhs:
              return plgpu.BlockSpec((bn, bk), lambda kk: (cb, kk), delay_release=1)
            return plgpu.BlockSpec((bk, bn), lambda kk: (kk, cb), delay_release=1)

          def mm(acc_ref, a, b):
            plgpu.wgmma(acc_ref, a, b.transpose((1, 0)) if transpose_rhs else b)

          if epilogue == "swiglu":
            width_blocks = fs[gi] // 2 // bn

            def acc_scope(acc_g, acc_u):
              def step(_, a, bg, bu):
                mm(acc_g, a, bg)
                mm(acc_u, a, bu)
              plgpu.emit_pipeline(step, grid=(nk,),
                                  in_specs=[lhs_spec, rhs_spec(c), rhs_spec(c + width_blocks)],
                                  max_concurrent_steps=steps)(lhs_gmem, w_ref, w_ref)
              return acc_g[...], acc_u[...]

            gate, up = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)), plgpu.ACC((bm, bn)))
            gate = gate.astype(dtype).astype(jnp.float32)
            up = up.astype(dtype).astype(jnp.float32)
            h = gate * _sigmoid(gate) * up
            dests = [(h, out_gmems[0], c)]
            if save_gu:
              dests += [(gate, out_gmems[1], c), (up, out_gmems[1], c + wmax // bn)]
            store(dests)
          else:
            cb_rhs = c  # logical column block (the split layout only moves the output)

            def acc_scope(acc):
              plgpu.emit_pipeline(lambda _, a, b: mm(acc, a, b), grid=(nk,),
                                  in_specs=[lhs_spec, rhs_spec(cb_rhs)],
                                  max_concurrent_steps=steps)(lhs_gmem, w_ref)
              return acc[...]

            if epilogue == "swiglu_bwd":
              @functools.partial(pl.run_scoped,
                                 gu_smem=plgpu.SMEM((2, bm, bn), dtype),
                                 bar=plgpu.Barrier(num_barriers=2))
              def _(gu_smem, bar):
                for i, cb in enumerate((c, c + wmax // bn)):
                  plgpu.copy_gmem_to_smem(
                      gu_gmem.at[pl.ds(tile_row0, bm), pl.ds(cb * bn, bn)],
                      gu_smem.at[i], bar.at[i])
                dh = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))
                dh = dh.astype(dtype).astype(jnp.float32)
                plgpu.barrier_wait(bar.at[0])
                plgpu.barrier_wait(bar.at[1])
                gate = gu_smem[0].astype(jnp.float32)
                up = gu_smem[1].astype(jnp.float32)
                sig = _sigmoid(gate)
                dg = dh * up * sig * (1.0 + gate * (1.0 - sig))
                du = dh * gate * sig
                store([(dg, out_gmems[0], c), (du, out_gmems[0], c + wmax // bn)])
            else:
              acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))
              if out_split:
                half = ncol_g[gi] // 2
                ob = jnp.where(c < half, c, c - half + out_half_blocks)
              else:
                ob = c
              store([(acc, out_gmems[0], ob)])

      @pl.when(g == num_groups)
      def _():
        zeros = jnp.zeros((bm, bn), jnp.float32)
        if epilogue == "swiglu":
          dests = [(zeros, out_gmems[0], c)]
          if save_gu:
            dests += [(zeros, out_gmems[1], c), (zeros, out_gmems[1], c + wmax // bn)]
        else:
          dests = [(zeros, out_gmems[0], c)]
        store(dests)

  if epilogue == "swiglu":
    out_type = [jax.ShapeDtypeStruct((m, wmax), dtype)]
    if save_gu:
      out_type.append(jax.ShapeDtypeStruct((m, 2 * wmax), dtype))
  else:
    out_type = [jax.ShapeDtypeStruct((m, out_cols), dtype)]
  extra = [gu] if epilogue == "swiglu_bwd" else []
  outs = _kernel(body, out_type, cfg)(*work, lhs, *rhs, *extra)
  return outs


def tgmm(lhs, rhs, group_sizes, shapes, *, lhs_split=False, rhs_split=False, cfg=Config()):
  """Per-expert lhsᵀ·rhs over the expert's rows on Hopper; see reference.tgmm_ref."""
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
  counts = [n * a * b for a, b in zip(kb, fb)]
  offsets = [sum(counts[:i]) for i in range(num_groups + 1)]
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
      for gi in range(num_groups):
        @pl.when((f >= offsets[gi]) & (f < offsets[gi + 1]))
        def _(gi=gi):
          q = f - offsets[gi]
          e_local = q // (kb[gi] * fb[gi])
          r = q % (kb[gi] * fb[gi])
          i, j = r // fb[gi], r % fb[gi]
          e = gi * n + e_local
          s, en = starts_ref[e], ends_ref[e]
          b0 = s // bt
          nb = jnp.where(en > s, (en + bt - 1) // bt - b0, 0)
          ci = metadata.split_block(i, kb[gi] // 2, lhs_half) if lhs_split else i
          cj = metadata.split_block(j, fb[gi] // 2, rhs_half) if rhs_split else j

          def acc_scope(acc_ref):
            def step(idx, a_smem, b_smem):
              rb = idx[0]
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
            plgpu.copy_smem_to_gmem(
                o_smem, out_gmems[gi].at[e_local, pl.ds(i * bm, bm), pl.ds(j * bn, bn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_type = [jax.ShapeDtypeStruct((n, k, f), dtype) for k, f in zip(ks, fs)]
  return tuple(_kernel(body, out_type, cfg)(starts, ends, lhs, rhs))


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
