"""The routed experts at decode on Hopper: fixed slot blocks, one copy ring per SM.

At decode (`mohge_jax.dispatch.capacity_experts` with stacked weights) every expert owns
a slot block of C rows (C a multiple of the row tile), so every work item is known when
tracing: (expert, row tile, output column tile), each a K loop of TMA copies and wgmma.
`gpu.hgmm`, built for training, runs one `emit_pipeline` per work item: it fills and
drains ~6 times an SM per projection, each item waits for its output's store, and its
weight tiles are bk rows of 2 bn bytes spread over the stacked matrix. At decode the
kernels are bound by reading the weights, so both cost bandwidth (61% of it in the ninth
session: 1.57 ms of a 4.48 ms MoHGE-3B step at batch 256).

Here:
- All items' steps form one global sequence (group by group; in a group expert by expert,
  then row tile, column tile, K; or, where every group has as many column tiles but their K
  lengths differ, the down projection, groups innermost: `_Layout.interleaved`). SM i runs
  the contiguous steps [start_i, start_i + count_i), cut at item ends with the smallest
  largest share (`sm_ranges`).
- One ring of `steps` SMEM slots per SM, filled across item boundaries: the copies of the
  next item's first steps are in flight during an item's last steps and its epilogue. A
  step's blocks come from a cursor advanced by selects and adds (`_Layout.advance`);
  earlier versions (one `emit_pipeline` over an SM's steps) read them from a table in
  global memory or derived them from the step's position by divisions in every fetch:
  1.15-1.4x slower than `gpu.hgmm` on the H200 (benchmarks/notes_generate.md).
- Outputs go through two SMEM buffers, so a store is not awaited before the next item.
- The weights are stored tiled (`tile_weights`, once per generation): an item's K loop
  reads one contiguous run.
- Dropless decode (`rows_used`): a slot block of C >= T rows an expert, of which the
  kernels run only the row tiles the fullest expert fills, as passes over one row tile's
  step sequence (a device scalar, so no `lax.cond` around the kernels).

Reference: `reference.hgmm_ref` with every expert's rows = C.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import gpu


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The global step sequence of one projection (static, hashable). Per group g: K steps
  an item nk[g], output column tiles cols[g], its first step, and where its experts'
  weight blocks start in the stacked matrix (k_base/f_base, in bk-row / bn-column blocks)
  and how far apart they are (k_stride/f_stride: along whichever axis they are stacked)."""
  n: int              # experts a group
  tiles: int          # row tiles an expert (C / bm)
  swiglu: bool
  k_blocks: int       # bk-row blocks of the stacked matrix (its K / bk): `tile_weights`
  nk: tuple[int, ...]
  cols: tuple[int, ...]
  first_step: tuple[int, ...]   # each group's first step, group by group (cursor, num_steps)
  k_base: tuple[int, ...]
  k_stride: tuple[int, ...]
  f_base: tuple[int, ...]
  f_stride: tuple[int, ...]
  # Items ordered (expert in group, row tile, column tile, group): the groups innermost, so
  # consecutive items mix K lengths and the contiguous shares even out. MoHGE-3B's down
  # projection (K 3..10 steps by group) on 132 SMs: the largest share 26 steps against 30
  # group by group (the mean 25.2). Needs every group's column tiles equal (`of`).
  interleaved: bool = False

  @staticmethod
  def of(st: gpu.Stacking, rows_per_expert: int, swiglu: bool, cfg: gpu.Config):
    bm, bk = cfg.bm, cfg.bk
    bn = cfg.bn_up if swiglu else cfg.bn
    if rows_per_expert % bm:
      raise ValueError(f"rows per expert {rows_per_expert} is not a multiple of bm={bm}")
    tiles = rows_per_expert // bm
    off = st.offsets()
    nk, cols, k_base, k_stride, f_base, f_stride = [], [], [], [], [], []
    for g, (p, q) in enumerate(st.shapes):
      f = q // 2 if swiglu else q   # swiglu: gate columns, then as many up columns
      if p % bk or f % bn:
        raise ValueError(f"weights [{p}, {q}] do not tile by bk={bk}, bn={bn}")
      nk.append(p // bk)
      cols.append(f // bn)
      first = int(off[g * st.n])
      if st.by_rows:    # [sum P, Q]: an expert's rows
        k_base.append(first // bk), k_stride.append(p // bk), f_base.append(0), f_stride.append(0)
      else:             # [P, sum Q]: an expert's columns
        k_base.append(0), k_stride.append(0), f_base.append(first // bn), f_stride.append(q // bn)
    items = [st.n * tiles * c for c in cols]
    first_step = np.concatenate([[0], np.cumsum(np.multiply(items, nk))[:-1]])
    k_total = sum(p for p, _ in st.shapes) * st.n if st.by_rows else st.shapes[0][0]
    interleaved = len(set(cols)) == 1 and len(set(nk)) > 1
    return _Layout(st.n, tiles, swiglu, k_total // bk, tuple(nk), tuple(cols),
                   tuple(int(v) for v in first_step), tuple(k_base), tuple(k_stride),
                   tuple(f_base), tuple(f_stride), interleaved)

  @property
  def num_steps(self) -> int:
    return self.first_step[-1] + self.n * self.tiles * self.cols[-1] * self.nk[-1]

  def items(self) -> list[tuple[int, int, int, int]]:
    """Every item (g, expert in group, row tile, column tile) in sequence order."""
    if self.interleaved:
      return [(g, el, r, c) for el in range(self.n) for r in range(self.tiles)
              for c in range(self.cols[0]) for g in range(len(self.nk))]
    return [(g, el, r, c) for g in range(len(self.nk)) for el in range(self.n)
            for r in range(self.tiles) for c in range(self.cols[g])]

  def item_ends(self) -> np.ndarray:
    """Global step index one past each item's last step, in order."""
    return np.cumsum([self.nk[g] for g, *_ in self.items()]).astype(np.int64)

  def cursor(self, pos):
    """The step at global position pos (int32 scalar, traced): (g, expert in group, row
    tile, column tile, K step) as int32 scalars. Divisions: once per SM, not per step."""
    if self.interleaved:   # a cycle: one item of each group, sum(nk) steps
      cycle = sum(self.nk)
      starts = np.concatenate([[0], np.cumsum(self.nk)[:-1]])
      it = lax.div(pos, jnp.int32(cycle))
      within = pos - it * cycle
      g = jnp.int32(0)
      for gi in range(1, len(self.nk)):
        g = jnp.where(within >= int(starts[gi]), jnp.int32(gi), g)
      kk = within - gpu._pick(g, tuple(int(v) for v in starts))
      cols = self.cols[0]
      c = it - lax.div(it, jnp.int32(cols)) * cols
      rt = lax.div(it, jnp.int32(cols))
      r = rt - lax.div(rt, jnp.int32(self.tiles)) * self.tiles
      return (g, lax.div(rt, jnp.int32(self.tiles)), r, c, kk)
    g = jnp.int32(0)
    for gi in range(1, len(self.nk)):
      g = jnp.where(pos >= self.first_step[gi], jnp.int32(gi), g)
    nk, cols = gpu._pick(g, self.nk), gpu._pick(g, self.cols)
    rel = pos - gpu._pick(g, self.first_step)
    it = lax.div(rel, nk)
    kk = rel - it * nk
    per_expert = cols * self.tiles
    el = lax.div(it, per_expert)
    rem = it - el * per_expert
    r = lax.div(rem, cols)
    return (g, el, r, rem - r * cols, kk)

  def advance(self, cur):
    """The cursor of the next step: selects and adds, no divisions (run every step)."""
    g, el, r, c, kk = cur
    if self.interleaved:   # K, then group, column tile, row tile, expert
      kk = kk + 1
      wrap = kk == gpu._pick(g, self.nk)
      kk = jnp.where(wrap, 0, kk)
      g = g + wrap.astype(jnp.int32)
      wrap = g == len(self.nk)
      g = jnp.where(wrap, 0, g)
      c = c + wrap.astype(jnp.int32)
      wrap = c == self.cols[0]
      c = jnp.where(wrap, 0, c)
      r = r + wrap.astype(jnp.int32)
      wrap = r == self.tiles
      r = jnp.where(wrap, 0, r)
      return (g, el + wrap.astype(jnp.int32), r, c, kk)
    kk = kk + 1
    wrap = kk == gpu._pick(g, self.nk)
    kk = jnp.where(wrap, 0, kk)
    c = c + wrap.astype(jnp.int32)
    wrap = c == gpu._pick(g, self.cols)
    c = jnp.where(wrap, 0, c)
    r = r + wrap.astype(jnp.int32)
    wrap = r == self.tiles
    r = jnp.where(wrap, 0, r)
    el = el + wrap.astype(jnp.int32)
    wrap = el == self.n
    el = jnp.where(wrap, 0, el)
    return (g + wrap.astype(jnp.int32), el, r, c, kk)

  def blocks(self, cur):
    """A cursor's block indices: lhs (row, K), rhs (K, F[, F of the up half]) and the
    output column block."""
    g, el, r, c, kk = cur
    pick = gpu._pick
    rk = pick(g, self.k_base) + el * pick(g, self.k_stride) + kk
    f = pick(g, self.f_base) + el * pick(g, self.f_stride) + c
    rhs = (rk, f, f + pick(g, self.cols)) if self.swiglu else (rk, f)
    return dict(lhs=((g * self.n + el) * self.tiles + r, kk), rhs=rhs, out_col=c)


@functools.lru_cache(maxsize=None)   # per (layout, SMs): each layer's call traces the same
def sm_ranges(layout: _Layout, num_sms: int) -> np.ndarray:
  """int32 [num_sms, 3]: each SM's (first global step, step count, item count): the items
  cut into num_sms contiguous runs with the smallest largest run (a binary search over
  that bound, each SM filled greedily up to it)."""
  ends = layout.item_ends()
  sizes = np.diff(np.concatenate([[0], ends]))

  def cuts_for(bound):
    cuts, load = [0], 0
    for end, size in zip(ends, sizes):
      if load + size > bound:
        cuts.append(int(end - size))
        load = 0
      load += size
    return cuts

  lo, hi = max(int(sizes.max()), -(-int(ends[-1]) // num_sms)), int(ends[-1])
  while lo < hi:
    mid = (lo + hi) // 2
    if len(cuts_for(mid)) <= num_sms:
      hi = mid
    else:
      lo = mid + 1
  cuts = cuts_for(lo)
  cuts += [int(ends[-1])] * (num_sms + 1 - len(cuts))   # idle SMs: no steps
  cuts = np.asarray(cuts, np.int64)
  items = np.diff(np.searchsorted(ends, cuts, side="right"))   # items ending in each run
  ranges = np.stack([cuts[:-1], np.diff(cuts), items], axis=1).astype(np.int32)
  ranges.setflags(write=False)   # shared by the cache
  return ranges


def tile_weights(flat, st: gpu.Stacking, cfg: gpu.Config = gpu.Config(), *, swiglu: bool):
  """A stacked weight matrix [K, F] (`gpu.stack_weights`: experts side by side, K = d, or
  one below the other, K = the sum of their rows) as `slot_gmm` reads it: its (bk x bn)
  blocks in the order the kernel's work items stream them, column block by column block,
  K blocks in order within each, every block's rows consecutive: [(F / bn) (K / bk) bk,
  bn]. A work
  item's whole K loop is then one contiguous run (128 KB for MoHGE-3B's up projection)
  instead of bk rows of 2 bn bytes at a stride of 2F bytes (the stacked matrix: rows
  213 KB apart for w_gate_up), which DRAM serves at well below its peak. Returns the
  pair (tiled matrix, st) that `slot_gmm` takes."""
  bk, bn = cfg.bk, (cfg.bn_up if swiglu else cfg.bn)
  k, f = flat.shape
  if k % bk or f % bn:
    raise ValueError(f"a [{k}, {f}] weight matrix does not tile by bk={bk}, bn={bn}")
  tiled = flat.reshape(k // bk, bk, f // bn, bn).transpose(2, 0, 1, 3)
  return tiled.reshape(f // bn * k, bn), st


def _check_operands(name, lhs, flat, st, layout, rows_per_expert, swiglu, cfg):
  """The tiled weights' shape (`tile_weights`) and the slot block's rows, or a ValueError."""
  f_total = st.shapes[0][1] if st.by_rows else sum(q for _, q in st.shapes) * st.n
  bn = cfg.bn_up if swiglu else cfg.bn
  want = (f_total // bn * layout.k_blocks * cfg.bk, bn)
  if flat.shape != want:
    raise ValueError(f"{name}: rhs {flat.shape} is not the tiled matrix of these weights "
                     f"({want}): tile_weights")
  if lhs.shape[0] != rows_per_expert * st.n * len(st.shapes):
    raise ValueError(f"lhs has {lhs.shape[0]} rows, not {rows_per_expert} for each of "
                     f"{st.n * len(st.shapes)} experts")


def _tiles(cfg, layout):
  """(bm, bk, ring steps, bn, weight blocks a step: 2 for the SwiGLU up projection)."""
  swiglu = layout.swiglu
  return cfg.bm, cfg.bk, cfg.steps, cfg.bn_up if swiglu else cfg.bn, 2 if swiglu else 1


def _store_tile(vals, swiglu, buf_smem, dst_gmem):
  """An item's output tile: silu(gate) * up (gate and up rounded to the output dtype
  first, as `gpu.hgmm`) or the product, through one of the two SMEM output buffers to
  dst_gmem; the buffer's store two items ago awaited first, this one not."""
  dtype = buf_smem.dtype
  if swiglu:
    gate, up = (v.astype(dtype).astype(jnp.float32) for v in vals)
    out = gate * gpu._sigmoid(gate) * up
  else:
    out = vals[0]
  plgpu.wait_smem_to_gmem(1, wait_read_only=True)
  buf_smem[...] = out.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(buf_smem, dst_gmem)


def _ring_scratch(cfg, layout, dtype):
  """The copy ring (lhs and weight blocks a step), two output buffers, a barrier a slot."""
  bm, bk, steps, bn, n_rhs = _tiles(cfg, layout)
  return (plgpu.SMEM((steps, bm, bk), dtype),
          *[plgpu.SMEM((steps, bk, bn), dtype) for _ in range(n_rhs)],
          plgpu.SMEM((2, bm, bn), dtype),
          plgpu.Barrier(num_arrivals=1 + n_rhs, num_barriers=steps))


def slot_gmm(lhs, rhs, *, rows_per_expert: int, swiglu: bool, out_cols: int,
             cfg: gpu.Config = gpu.Config(), pdl: bool = False, rows_used=None,
             _ablate: str = ""):
  """Every expert's `rows_per_expert` rows of lhs [E * C, K] times its weights.

  rhs: (tiled matrix, gpu.Stacking) from `tile_weights(*gpu.stack_weights(ws))` with the
  same cfg and swiglu. swiglu: rhs is w_gate_up and the output [E * C, out_cols] holds
  silu(gate) * up in its first W_e columns (the rest unwritten); else rhs is w_down and
  the output [E * C, out_cols] = lhs[:, :W_e] @ w_down_e. Products in bf16/f16 with
  float32 accumulation; gate and up rounded to the input dtype before the SwiGLU, as
  `gpu.hgmm`. pdl: launched with programmatic dependent launch (`plgpu.griddepcontrol_wait`):
  the kernel may start while the kernels before it finish; it issues its first steps'
  weight copies (nothing before it writes the weights), then waits for them before its
  first lhs copy, and lets the kernel after it launch (the down projection's CTAs then
  start as this one's leave their SMs). Not in the interpreter (it has no such wait; the
  copies' order is the same). _ablate="no_mma" (benchmarks only: a wrong result) skips
  the products: the copies, ring and stores alone.

  rows_used (int32 [1] on the device, e.g. `route_gpu.RouteSlots.max_count`): only the
  first rows_used rows of each expert's C are needed (the rest are not computed, or are
  computed and left unread). The kernel then runs in passes, pass p being row tile p of
  every expert, ceil(rows_used / bm) of them (at least 1, at most C / bm); every pass walks
  the same per-SM ranges of one row tile's step sequence, and the copy ring runs on across
  the passes. For a dropless decode: C >= T so that no expert overflows its slot block,
  and a step whose fullest expert has <= bm pairs (MoHGE-3B at batch 256: C = 256, bm =
  64, 6 pairs a token over 64 experts) costs what a block of C = bm rows does, with no
  `lax.cond` around the kernels (a CUDA-graph conditional: ~20 us a MoHGE-3B layer on the
  H200, twenty-fourth session).
  """
  if _ablate not in ("", "no_mma"):
    raise ValueError(f"slot_gmm: _ablate={_ablate!r}: must be '' or 'no_mma'")
  flat, st = rhs
  if rows_used is not None:
    if rows_per_expert % cfg.bm:
      raise ValueError(f"rows per expert {rows_per_expert} is not a multiple of bm={cfg.bm}")
    if jnp.shape(rows_used) != (1,) or jnp.result_type(rows_used) != jnp.int32:
      raise ValueError(f"slot_gmm: rows_used must be int32 [1], got "
                       f"{jnp.result_type(rows_used)} {jnp.shape(rows_used)}")
  tiles = 1 if rows_used is None else rows_per_expert // cfg.bm   # row tiles in passes
  layout = _Layout.of(st, rows_per_expert // tiles, swiglu, cfg)
  _check_operands("slot_gmm", lhs, flat, st, layout, rows_per_expert, swiglu, cfg)
  ranges = sm_ranges(layout, gpu._num_sms(cfg))
  used = jnp.zeros((1,), jnp.int32) if rows_used is None else rows_used
  return _slot_gmm(lhs, flat, jnp.asarray(ranges), used, layout=layout, tiles=tiles,
                   passes=rows_used is not None, out_cols=out_cols, cfg=cfg, pdl=bool(pdl),
                   ablate=_ablate)


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "passes", "out_cols", "cfg",
                                             "pdl", "ablate"))
def _slot_gmm(lhs, rhs_flat, ranges, used, *, layout, tiles, passes, out_cols, cfg, pdl=False,
              ablate=""):
  m, _ = lhs.shape
  dtype = lhs.dtype
  bm, bk, steps, bn, n_rhs = _tiles(cfg, layout)
  swiglu = layout.swiglu

  def body(ranges_ref, used_ref, lhs_gmem, rhs_gmem, out_gmem, lhs_ring, *scratch):
    *rhs_rings, o_smem, bar = scratch
    sm = lax.axis_index("sm")
    start, count, n_items = ranges_ref[sm, 0], ranges_ref[sm, 1], ranges_ref[sm, 2]
    # A cursor is (pass, step within the pass, the layout's cursor of that step); without
    # passes the pass stays 0 and the step is not counted.
    cur0 = layout.cursor(start)
    if passes:
      n_pass = jnp.clip(lax.div(used_ref[0] + (bm - 1), jnp.int32(bm)), 1, tiles)
      total, total_items = count * n_pass, n_items * n_pass
    else:
      total, total_items = count, n_items

    def advance(c):
      p, sl, cur = c
      if not passes:
        return p, sl, layout.advance(cur)
      sl = sl + 1
      wrap = sl == count   # the SM's range of this pass done: the next pass's first step
      cur = jax.tree.map(functools.partial(jnp.where, wrap), cur0, layout.advance(cur))
      return p + wrap.astype(jnp.int32), jnp.where(wrap, 0, sl), cur

    def row_block(c, b):   # the lhs / output row tile of cursor c (blocks b)
      return b["lhs"][0] * tiles + c[0]

    def fetch(step, c, lhs=True, rhs=True):
      """Issue step `step`'s copies (its cursor `c`) into its ring slot."""
      slot = lax.rem(step, steps)
      b = layout.blocks(c[2])
      if lhs:
        k = b["lhs"][1]
        plgpu.copy_gmem_to_smem(
            lhs_gmem.at[pl.ds(row_block(c, b) * bm, bm), pl.ds(k * bk, bk)],
            lhs_ring.at[slot], bar.at[slot])
      rk, *fs = b["rhs"]
      for ring, f in zip(rhs_rings if rhs else (), fs):   # block (rk, f) of the tiled matrix
        plgpu.copy_gmem_to_smem(rhs_gmem.at[pl.ds((f * layout.k_blocks + rk) * bk, bk)],
                                ring.at[slot], bar.at[slot])

    # prologue: the first `steps` steps' copies in flight; with pdl the weights' first,
    # while the kernels before this one may still run, the lhs (their output) after the wait
    cur = (jnp.int32(0), jnp.int32(0), cur0)
    fcur = cur
    parts = ((dict(lhs=False), dict(rhs=False)) if pdl else (dict(),))
    for n, part in enumerate(parts):
      if n:
        if not cfg.interpret:
          plgpu.griddepcontrol_wait()
          # the next kernel (the down projection after the up) may launch now: its CTAs
          # take SMs as this kernel's leave and load their weights while the rest finish
          plgpu.griddepcontrol_launch_dependents()
        fcur = cur
      for i in range(steps):
        @pl.when(i < total)
        def _(i=i, fcur=fcur, part=part):
          fetch(jnp.int32(i), fcur, **part)
        fcur = advance(fcur)

    def item(j, carry):
      s0, cur, fcur = carry

      def acc_scope(*accs):
        def k_step(_, carry):
          s, cur, fcur = carry
          slot = lax.rem(s, steps)
          plgpu.barrier_wait(bar.at[slot])
          for acc, ring in zip(accs, rhs_rings):
            if ablate != "no_mma":
              plgpu.wgmma(acc, lhs_ring.at[slot], ring.at[slot])
          plgpu.wgmma_wait(1)     # the step before's products are done: its slot is free,
          nxt = s + steps - 1     # refilled with the step `steps` - 1 ahead (any item's)

          @pl.when((s > 0) & (nxt < total))
          def _():
            fetch(nxt, fcur)
          fcur = jax.tree.map(functools.partial(jnp.where, s > 0), advance(fcur), fcur)
          return s + 1, advance(cur), fcur

        nk = gpu._pick(cur[2][0], layout.nk)
        return (lax.fori_loop(0, nk, k_step, (s0, cur, fcur)),
                *[acc[...] for acc in accs])

      (s1, cur1, fcur1), *vals = pl.run_scoped(acc_scope,
                                               *[plgpu.ACC((bm, bn)) for _ in range(n_rhs)])
      b = layout.blocks(cur[2])
      _store_tile(vals, swiglu, o_smem.at[lax.rem(j, 2)],
                  out_gmem.at[pl.ds(row_block(cur, b) * bm, bm), pl.ds(b["out_col"] * bn, bn)])
      return s1, cur1, fcur1

    lax.fori_loop(0, total_items, item, (jnp.int32(0), cur, fcur))
    plgpu.wait_smem_to_gmem(0)

  out_type = jax.ShapeDtypeStruct((m, out_cols), dtype)
  scratch = _ring_scratch(cfg, layout, dtype)
  return gpu._kernel(body, out_type, cfg, scratch_types=scratch)(ranges, used, lhs, rhs_flat)


def slot_gmm_active(lhs, rhs, active, *, rows_per_expert: int, swiglu: bool, out_cols: int,
                    cfg: gpu.Config = gpu.Config()):
  """`slot_gmm` for the experts listed in `active` only (int32 [A] expert indices, -1 for
  none; distinct): the first row tile (bm rows) of each listed expert's slot block, the
  other rows of the output left unwritten. For decode steps whose tokens choose few of the
  E experts (fewer than E / K tokens; MoHGE-3B at batch 1: 6 of 64), where `slot_gmm`
  would read every expert's weights: the work items are (listed expert, output column
  tile), spread over the SMs in turn (item j on SM j mod SMs), each a K loop through a copy
  ring of `cfg.steps` slots, so a step reads ~A/E of the weights.

  lhs [E * C, K], rhs and the rest as `slot_gmm`'s (C = rows_per_expert, a multiple of bm;
  the listed experts' pairs in their first bm rows)."""
  flat, st = rhs
  bm = cfg.bm
  if rows_per_expert % bm:
    raise ValueError(f"rows per expert {rows_per_expert} is not a multiple of bm={bm}")
  if cfg.steps < 2:
    raise ValueError(f"slot_gmm_active: needs a ring of at least 2 steps, got {cfg.steps}")
  if active.ndim != 1 or active.dtype != jnp.int32:
    raise ValueError(f"slot_gmm_active: active must be int32 [A], got {active.dtype} "
                     f"{active.shape}")
  layout = _Layout.of(st, bm, swiglu, cfg)
  _check_operands("slot_gmm_active", lhs, flat, st, layout, rows_per_expert, swiglu, cfg)
  return _slot_gmm_active(lhs, flat, active, layout=layout, tiles=rows_per_expert // bm,
                          out_cols=out_cols, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "out_cols", "cfg"))
def _slot_gmm_active(lhs, rhs_flat, active, *, layout, tiles, out_cols, cfg):
  m, _ = lhs.shape
  dtype = lhs.dtype
  bm, bk, steps, bn, n_rhs = _tiles(cfg, layout)
  swiglu = layout.swiglu
  num_sms = gpu._num_sms(cfg)
  max_cols = max(layout.cols)
  n_items = active.shape[0] * max_cols
  pick = gpu._pick

  def body(active_ref, lhs_gmem, rhs_gmem, out_gmem, lhs_ring, *scratch):
    *rhs_rings, o_smem, bar = scratch
    sm = lax.axis_index("sm")
    # this SM's items: j = sm + i * num_sms for i < mine
    mine = lax.div(jnp.int32(n_items) - sm + (num_sms - 1), jnp.int32(num_sms))

    def item(i, carry):
      s0, stored = carry        # ring steps issued so far; output stores issued so far
      j = sm + i * num_sms
      a = lax.div(j, jnp.int32(max_cols))
      c = j - a * max_cols
      e = active_ref[a]
      g = lax.div(jnp.maximum(e, 0), jnp.int32(layout.n))
      el = jnp.maximum(e, 0) - g * layout.n
      nk, cols = pick(g, layout.nk), pick(g, layout.cols)
      valid = (e >= 0) & (c < cols)
      rk0 = pick(g, layout.k_base) + el * pick(g, layout.k_stride)
      f = pick(g, layout.f_base) + el * pick(g, layout.f_stride) + c
      fs = (f, f + cols) if swiglu else (f,)
      row = (g * layout.n + el) * tiles   # the expert's first row tile

      def fetch(t):   # local K step t into the ring slot of global step s0 + t
        slot = lax.rem(s0 + t, steps)
        plgpu.copy_gmem_to_smem(lhs_gmem.at[pl.ds(row * bm, bm), pl.ds(t * bk, bk)],
                                lhs_ring.at[slot], bar.at[slot])
        for ring, fb in zip(rhs_rings, fs):
          plgpu.copy_gmem_to_smem(
              rhs_gmem.at[pl.ds((fb * layout.k_blocks + rk0 + t) * bk, bk)],
              ring.at[slot], bar.at[slot])

      @pl.when(valid)
      def _():
        for t in range(steps - 1):   # the prologue: all but one slot (the last is refilled
          @pl.when(t < nk)            # at step 0: the slot the item before finished with)
          def _(t=t):
            fetch(jnp.int32(t))

        def acc_scope(*accs):
          def k_step(t, carry):
            slot = lax.rem(s0 + t, steps)
            plgpu.barrier_wait(bar.at[slot])
            for acc, ring in zip(accs, rhs_rings):
              plgpu.wgmma(acc, lhs_ring.at[slot], ring.at[slot])
            plgpu.wgmma_wait(1)   # step t - 1's products are done: its slot is free

            @pl.when(t + steps - 1 < nk)
            def _():
              fetch(t + steps - 1)
            return carry
          lax.fori_loop(0, nk, k_step, jnp.int32(0))
          return [acc[...] for acc in accs]

        vals = pl.run_scoped(acc_scope, *[plgpu.ACC((bm, bn)) for _ in range(n_rhs)])
        _store_tile(vals, swiglu, o_smem.at[lax.rem(stored, 2)],
                    out_gmem.at[pl.ds(row * bm, bm), pl.ds(c * bn, bn)])

      return (s0 + jnp.where(valid, nk, 0), stored + valid.astype(jnp.int32))

    lax.fori_loop(0, mine, item, (jnp.int32(0), jnp.int32(0)))
    plgpu.wait_smem_to_gmem(0)

  out_type = jax.ShapeDtypeStruct((m, out_cols), dtype)
  scratch = _ring_scratch(cfg, layout, dtype)
  return gpu._kernel(body, out_type, cfg, scratch_types=scratch)(active, lhs, rhs_flat)
