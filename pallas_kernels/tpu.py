"""Mosaic TPU kernels (Pallas, scalar-prefetched work lists); also run by the interpreter.

hgmm: grid (output column block p, row item t, k step). The work list (metadata.py) is
prefetched into SMEM and drives every index map, so a single launch covers all groups
and all widths: group g's weights are one input each, whose index map only moves while
an item of g runs. Items that share a row tile are neighbours in t, so with p outermost
their output block stays resident and each item merges its own rows into it.

tgmm (weight gradient): grid (k block, f block, row item t); the items of one expert are
neighbours, so its output block stays resident while its row tiles are summed; grid
steps of other groups leave each output's block index where it is, so no block is
visited twice. Experts without rows get one empty item, so their gradient is written
(as zeros).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import metadata
from pallas_kernels.ffn import Ops

_META_FIELDS = ("group", "local", "tile", "row_start", "row_end", "first", "last")


def _meta_args(items):
  return [getattr(items, f) for f in _META_FIELDS] + [items.num_items[None]]


def _pick_tile(dims, want):
  """Largest power-of-two fraction of `want` that divides every dim."""
  t = want
  while any(d % t for d in dims):
    t //= 2
  return t


def _row_mask(tile, row_start, row_end, tm, cols):
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, cols), 0)
  return (rows >= row_start) & (rows < row_end)


def hgmm(lhs, rhs, group_sizes, *, transpose_rhs=False, lhs_split=False, out_split=False,
         out_cols=None, tm=128, tk=128, tn=128, interpret=False):
  m, kl = lhs.shape
  num_groups = len(rhs)
  ks = [w.shape[2] if transpose_rhs else w.shape[1] for w in rhs]
  fs = [w.shape[1] if transpose_rhs else w.shape[2] for w in rhs]
  if out_cols is None:
    out_cols = max(fs)
  tm = min(tm, m)
  tk = _pick_tile([k // 2 for k in ks] + [kl // 2] if lhs_split else ks, tk)
  tn = _pick_tile([f // 2 for f in fs] + [out_cols // 2] if out_split else fs + [out_cols], tn)
  nk = [k // tk for k in ks]
  nk_max = max(nk)
  num_p = out_cols // tn
  kl_half_blocks = kl // 2 // tk
  out_half_blocks = out_cols // 2 // tn
  items = metadata.row_items(group_sizes, m, tm, num_groups, include_empty=False,
                             include_padding=True)

  def col_of(g, p):
    """Output block p for group g → (logical rhs column block, valid)."""
    if out_split:
      return metadata.split_block_inverse(p, fs[g] // 2 // tn, out_half_blocks)
    return p, p < fs[g] // tn

  def lhs_map(p, t, kk, grp, loc, tile, rs, re, fi, la, n_items):
    g = grp[t]
    k_blocks = jnp.int32(1)
    half = jnp.int32(0)
    for gi in range(num_groups):
      k_blocks = jnp.where(g == gi, nk[gi], k_blocks)
      half = jnp.where(g == gi, nk[gi] // 2, half)
    kc = jnp.minimum(kk, k_blocks - 1)
    if lhs_split:
      kc = metadata.split_block(kc, half, kl_half_blocks)
    return tile[t], kc

  def rhs_map(gi):
    def index(p, t, kk, grp, loc, tile, rs, re, fi, la, n_items):
      active = grp[t] == gi
      c, valid = col_of(gi, p)
      c = jnp.clip(c, 0, fs[gi] // tn - 1)
      kc = jnp.minimum(kk, nk[gi] - 1)
      n = jnp.where(active, loc[t], 0)
      kc = jnp.where(active, kc, 0)
      c = jnp.where(active, c, 0)
      return (n, c, kc) if transpose_rhs else (n, kc, c)
    return index

  def out_map(p, t, kk, grp, loc, tile, rs, re, fi, la, n_items):
    return tile[t], p

  rhs_block = (pl.Squeezed(), tn, tk) if transpose_rhs else (pl.Squeezed(), tk, tn)
  in_specs = [pl.BlockSpec((tm, tk), lhs_map)]
  in_specs += [pl.BlockSpec(rhs_block, rhs_map(gi)) for gi in range(num_groups)]

  def kernel(grp, loc, tile, rs, re, fi, la, n_items, lhs_ref, *refs):
    rhs_refs, (out_ref, acc_ref) = refs[:num_groups], refs[num_groups:]
    p, t, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = grp[t]
    live = t < n_items[0]

    @pl.when(kk == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    for gi in range(num_groups):
      _, valid = col_of(gi, p)

      @pl.when(live & (g == gi) & valid & (kk < nk[gi]))
      def _():
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_refs[gi][...], dims,
                                            preferred_element_type=jnp.float32)

    valid_any = g == num_groups
    for gi in range(num_groups):
      valid_any = valid_any | ((g == gi) & col_of(gi, p)[1])

    @pl.when(live & (kk == nk_max - 1) & valid_any)
    def _():
      mask = _row_mask(tile[t], rs[t], re[t], tm, tn)
      val = jnp.where(g == num_groups, 0.0, acc_ref[...]).astype(out_ref.dtype)
      out_ref[...] = jnp.where(mask, val, out_ref[...])

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(_META_FIELDS) + 1,
      grid=(num_p, items.bound, nk_max),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((tm, tn), out_map),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
  )
  call = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((m, out_cols), lhs.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )
  return call(*_meta_args(items), lhs, *rhs)


def tgmm(lhs, rhs, group_sizes, shapes, *, lhs_split=False, rhs_split=False, tm=128,
         tk=128, tn=128, interpret=False):
  m, kl = lhs.shape
  _, fr = rhs.shape
  num_groups = len(shapes)
  n = shapes[0][0]
  ks = [s[1] for s in shapes]
  fs = [s[2] for s in shapes]
  tm = min(tm, m)
  tk = _pick_tile([k // 2 for k in ks] + [kl // 2] if lhs_split else ks, tk)
  tn = _pick_tile([f // 2 for f in fs] + [fr // 2] if rhs_split else fs, tn)
  kb = [k // tk for k in ks]
  fb = [f // tn for f in fs]
  lhs_half, rhs_half = kl // 2 // tk, fr // 2 // tn
  items = metadata.row_items(group_sizes, m, tm, num_groups, include_empty=True,
                             include_padding=False)

  def group_blocks(g, per_group):
    out = jnp.int32(1)
    for gi in range(num_groups):
      out = jnp.where(g == gi, per_group[gi], out)
    return out

  def lhs_map(i, j, t, grp, loc, tile, rs, re, fi, la, n_items):
    nb = group_blocks(grp[t], kb)
    c = jnp.minimum(i, nb - 1)
    if lhs_split:
      c = metadata.split_block(c, nb // 2, lhs_half)
    return tile[t], c

  def rhs_map(i, j, t, grp, loc, tile, rs, re, fi, la, n_items):
    nb = group_blocks(grp[t], fb)
    c = jnp.minimum(j, nb - 1)
    if rhs_split:
      c = metadata.split_block(c, nb // 2, rhs_half)
    return tile[t], c

  def out_map(gi):
    # Group gi's output blocks are each visited in one run of consecutive steps:
    # before gi's items a sweep (i, j) points at its first block, after them at its
    # last; sweeps gi has no block for point at the block the next valid sweep starts
    # with (or, past the last one, at the last block written).
    def index(i, j, t, grp, loc, tile, rs, re, fi, la, n_items):
      g = jnp.where(t < n_items[0], grp[t], num_groups)
      expert = jnp.where(g < gi, 0, jnp.where(g > gi, n - 1, loc[t]))
      valid = (i < kb[gi]) & (j < fb[gi])
      before_next = i < kb[gi] - 1
      expert = jnp.where(valid, expert, jnp.where(before_next, 0, n - 1))
      bi = jnp.where(valid, i, jnp.where(before_next, i + 1, kb[gi] - 1))
      bj = jnp.where(valid, j, jnp.where(before_next, 0, fb[gi] - 1))
      return expert, bi, bj
    return index

  def kernel(grp, loc, tile, rs, re, fi, la, n_items, lhs_ref, rhs_ref, *refs):
    out_refs, acc_ref = refs[:num_groups], refs[num_groups]
    i, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = grp[t]
    live = t < n_items[0]

    @pl.when(live & (fi[t] == 1))
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _():
      a = jnp.where(_row_mask(tile[t], rs[t], re[t], tm, tk), lhs_ref[...], 0)
      b = jnp.where(_row_mask(tile[t], rs[t], re[t], tm, tn), rhs_ref[...], 0)
      acc_ref[...] += jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)

    for gi in range(num_groups):
      @pl.when(live & (la[t] == 1) & (g == gi) & (i < kb[gi]) & (j < fb[gi]))
      def _():
        out_refs[gi][...] = acc_ref[...].astype(out_refs[gi].dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(_META_FIELDS) + 1,
      grid=(max(kb), max(fb), items.bound),
      in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), rhs_map)],
      out_specs=[pl.BlockSpec((pl.Squeezed(), tk, tn), out_map(gi))
                 for gi in range(num_groups)],
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
  )
  call = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((n, k, f), lhs.dtype) for k, f in zip(ks, fs)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("arbitrary", "arbitrary", "arbitrary")),
      interpret=interpret,
  )
  return tuple(call(*_meta_args(items), lhs, rhs))


class TpuOps(Ops):
  """Building blocks through the Mosaic TPU kernels (or their interpretation on CPU)."""

  name = "mosaic_tpu"

  def __init__(self, interpret=False, **tuning):
    super().__init__(interpret=interpret, **tuning)

  def _interp(self):
    mode = self.tuning["interpret"]
    if mode == "tpu":  # the TPU simulator: slower, but checks DMA and block revisits
      return pltpu.InterpretParams()
    return bool(mode)

  def _tiles(self):
    return {k: v for k, v in self.tuning.items() if k in ("tm", "tk", "tn")}

  def hgmm(self, lhs, rhs, group_sizes, **kw):
    return hgmm(lhs, rhs, group_sizes, interpret=self._interp(), **self._tiles(), **kw)

  def tgmm(self, lhs, rhs, group_sizes, shapes, **kw):
    return tgmm(lhs, rhs, group_sizes, [tuple(s) for s in shapes],
                interpret=self._interp(), **self._tiles(), **kw)
