"""Routing and slot assignment of one decode step in one Mosaic GPU kernel (Hopper), or in
two Triton launches over many SMs (impl="triton", below).

    r = route_slots(logits [T, G + E] f32, num_groups=G, top_k_groups=Kg, top_k=K,
                    combine_weights=..., capacity=C)

For decoding's batches through fixed slot blocks (`mohge_jax.dispatch.capacity_experts`
with stacked weights): the router's scores, choices and combine weights
(`mohge_jax.routing.two_level_route` for MoHGE, G > 0, group logits first; `topk_route` for
homogeneous MoE, G = 0) and each token-expert pair's slot e * C + c, c its rank among expert
e's pairs in token order (`dispatch._capacity_slots`). Returns `RouteSlots`: expert_ids,
weights, group_ids, slots [T, K] (ranks clipped to C - 1) and overflow (a bool scalar:
some expert got more than C pairs, so the slots are not valid and the caller must take
its exact fallback; with impl="triton" also the most pairs any expert got, so that a
caller with C >= T, which never overflows, runs only the row tiles it needs).

Why a kernel: in XLA this is ~20 launches a routed layer at decode (two top_k's, the
normalisations, a one-hot running count for the ranks, compares, maxima), ~0.6 ms of a
4.3 ms MoHGE-3B step at batch 256 on the H200 (benchmarks/notes_generate.md, tenth and
eleventh sessions): each a few microseconds on a [256, 64] problem.

Layout of the work: one CTA, a warpgroup for each chunk of 64 tokens (Lane semantics, the
WGMMA register layout: a row's scores over the four threads of a quad), so up to 256
tokens. Each warpgroup: the two-level router's float32 math with row reductions (a
group's softmax by masking its columns), top-k by repeated maxima (ties to the lower
index, as `lax.top_k`); then two tensor-core products of the chunk's 0/1 choices (bf16 in
SMEM, exact in the float32 accumulator): a strictly lower triangular [64, 64] times the
choices counts the chunk's earlier tokens, an all-ones one the chunk's totals. The totals
go through SMEM (one mbarrier for all warpgroups) and each chunk adds those of the chunks
before it. Outputs are [T, 8] tiles (K, Kg <= 8), sliced by the wrapper; the spare last
column of the group tile carries each token's largest rank (for `overflow`).

The first version ran the chunks one after another in one warpgroup: 43 us a MoHGE-3B
layer at batch 256 on the H200, slower than the XLA launches it replaces (one warp a
scheduler: every reduction's latency exposed). With a warpgroup a chunk, 30 us: its
module is ~20k operations of unrolled code issued by each of 16 warps (each group's
softmax a masked pass over all columns), so it is likely bound by instruction issue.
impl="rows" (`_route_rows`, 64 experts) takes a thread a token instead: 128 tokens a
warpgroup, a token's scores in its registers (register-only reductions, a group's
columns only), half the warps: right on the H200 (its GPU tests pass) and no faster, the
decode step 4.30-4.38 ms against 3.93 with XLA's routing (~30 us a layer, fifteenth
session). Both run all tokens in one thread block: a routing kernel that pays must spread
the tokens over many SMs (benchmarks/notes_generate.md; XLA's whole routing chain is
worth ~0.36 ms a step, an ablation's bound).

impl="triton" (`_route_triton`, Pallas' Triton backend) does: a thread block of a few
tokens (`triton_tile`: 4 tokens a warp; 4 in 1 warp at batch 256) routes them (a [4, E]
tile: 8 values a thread at E = 64) and ranks its pairs among its own (a cumsum down the
tokens), writing its pairs an expert; a second launch adds the earlier blocks' counts to
the ranks, writes the slots, each slot's token (so `dispatch.capacity_experts` needs no
scatter), each expert's pairs and the slot block's rows. Two launches of 64 blocks at
batch 256 in place of XLA's ~10 a layer: MoHGE-3B's decode step 3.70-3.73 ms against
3.83-3.87 with XLA's routing on the H200 (twenty-third session), 3.64 with 4-token blocks
(MIN_TILE_TOKENS, twenty-fourth); the decode default (`dispatch.DECODE_KERNEL_TUNING`).

Reference: `reference` (the routing functions and `_capacity_slots`' ranks in plain JAX).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as plt

ROWS = 64   # tokens a chunk (the WGMMA layout's rows)
COLS = 8    # columns of the small output tiles (K, Kg <= COLS; Kg < COLS)
COMBINES = ("softmax", "renormalize", "raw")
MAX_WARPGROUPS = 4   # one a chunk of tokens: up to 256 tokens (a decode batch)
IMPLS = ("wgmma", "rows", "triton")
ROW_TOKENS = 128     # impl="rows": tokens a warpgroup, one a thread
MAX_TRITON_TOKENS = 1024  # impl="triton": the slots' program holds every program's counts


# impl="triton": the fewest tokens a program. MoHGE-3B at batch 256 on the H200 (ms a
# step, each its own process; twenty-third session): 4 tokens and 1 warp 3.657-3.673, 4 and
# 2 3.667, 8 and 2 3.677-3.685, 2 and 1 3.688, 16 and 4 3.700-3.727, 16 and 2 3.760, 32 and
# 4 3.795. 4 x 1 since its outputs matched XLA's routing on the GPU (twenty-fourth
# session: the routed layer at batch 256, `test_route_gpu.py -m gpu`; 3.643-3.645 against
# 16 x 4's 3.679-3.706 in the same call).
MIN_TILE_TOKENS = 4


def triton_tile(T: int) -> tuple[int, int]:
  """impl="triton"'s tokens and warps a program for T tokens: 4 tokens a warp, at least
  MIN_TILE_TOKENS tokens and at most 64 programs (the slots' programs each read every
  program's counts, [programs, E] int32)."""
  tokens = max(MIN_TILE_TOKENS, 1 << (max(1, -(-T // 64)) - 1).bit_length())
  return tokens, min(4, tokens // 4)


class RouteSlots(NamedTuple):
  expert_ids: jax.Array  # [T, K] int32
  weights: jax.Array     # [T, K] float32 combine weights
  group_ids: jax.Array   # [T, Kg] int32 (MoE: zeros [T, 1])
  slots: jax.Array       # [T, K] int32: e * C + min(rank, C - 1)
  overflow: jax.Array    # bool scalar: some expert has more than C pairs
  # impl="triton" only (None otherwise): each slot's token [E * C] int32 (unfilled slots:
  # any value) and each expert's pairs [E] int32 (slot e * C + c is filled iff c < counts[e])
  slot_tokens: jax.Array | None = None
  counts: jax.Array | None = None
  # impl="triton" with x: each slot's token's row of x [E * C, D] (unfilled slots: any value)
  slot_x: jax.Array | None = None
  # impl="triton": the most pairs any expert got, int32 [1] (`slot_gpu.slot_gmm`'s
  # rows_used: with C >= T no pair overflows, and the slot kernels run only the row tiles
  # the fullest expert fills)
  max_count: jax.Array | None = None


def unsupported_reason(T: int, num_groups: int, E: int, top_k_groups: int, top_k: int,
                       impl: str = "wgmma") -> str | None:
  """Why these shapes cannot run with `impl` (None when they can)."""
  if impl == "triton":
    return _triton_unsupported_reason(T, num_groups, E, top_k_groups, top_k)
  if impl == "rows" and E != 64:
    return f"route kernel (impl='rows'): experts must be 64 (a token's scores in registers), got {E}"
  if T % ROWS or not ROWS <= T <= MAX_WARPGROUPS * ROWS:
    return (f"route kernel: tokens must be a multiple of {ROWS} up to "
            f"{MAX_WARPGROUPS * ROWS}, got {T}")
  if E not in (64, 128):
    return f"route kernel: experts must be 64 or 128, got {E}"
  if not 1 <= top_k <= COLS:
    return f"route kernel: top_k must be 1..{COLS}, got {top_k}"
  if num_groups and (num_groups != COLS or E % num_groups or not 1 <= top_k_groups < COLS):
    return (f"route kernel: two-level routing needs {COLS} groups and top_k_groups below "
            f"{COLS}; got {num_groups} groups, top_k_groups={top_k_groups}")
  return None


def _combine(vals, mode):
  """routing.combine on a list of per-rank row vectors."""
  if mode == "softmax":
    e = [jnp.exp(v - vals[0]) for v in vals]   # vals[0] is the largest
    total = functools.reduce(jnp.add, e)
    return [x / total for x in e]
  if mode == "renormalize":
    total = functools.reduce(jnp.add, vals)
    return [v / total for v in vals]
  return list(vals)


def _write_outputs(out_refs, rows, rank, chosen, ids, vals, gids, *, C, combine, ecol,
                   across, tile):
  """Both kernels' epilogue: each pair's slot (its expert's column of the token's ranks),
  the token's largest rank (for `overflow`) and the four [rows, COLS] output tiles."""
  ids_ref, w_ref, slot_ref, gid_ref = out_refs
  E = ecol.shape[1]
  slot_TxE = ecol * C + jnp.minimum(rank, C - 1)
  slots = [jnp.where(ecol == across(i, E), slot_TxE, 0).sum(axis=1) for i in ids]
  worst = jnp.where(chosen, rank, -1).max(axis=1)
  ids_ref[rows, :] = tile(ids, jnp.int32)
  w_ref[rows, :] = tile(_combine(vals, combine), jnp.float32)
  slot_ref[rows, :] = tile(slots, jnp.int32)
  gid_ref[rows, :] = tile(gids + [worst] * (COLS - len(gids)), jnp.int32)  # last: worst


def _launch(kernel, logits, *, T, W, G, K, Kg, C, interpret, scratch) -> RouteSlots:
  """Both kernels' launch (one CTA of W warpgroups) and their outputs' first T rows as
  RouteSlots."""
  Tp = logits.shape[0]
  ints = jax.ShapeDtypeStruct((Tp, COLS), jnp.int32)
  out = plgpu.kernel(
      kernel,
      out_type=(ints, jax.ShapeDtypeStruct((Tp, COLS), jnp.float32), ints, ints),
      grid=(1,), grid_names=("one",), num_threads=W, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      scratch_types=scratch,
  )(logits)
  ids8, w8, slot8, gid8 = (a[:T] for a in out)
  return RouteSlots(expert_ids=ids8[:, :K], weights=w8[:, :K],
                    group_ids=gid8[:, :Kg] if G else jnp.zeros((T, 1), jnp.int32),
                    slots=slot8[:, :K], overflow=jnp.max(gid8[:, COLS - 1]) >= C)


@functools.partial(jax.jit, static_argnames=("num_groups", "top_k_groups", "top_k",
                                             "combine_weights", "capacity", "interpret",
                                             "impl"))
def route_slots(logits, *, num_groups: int, top_k_groups: int, top_k: int,
                combine_weights: str, capacity: int, interpret: bool = False,
                impl: str = "wgmma", x=None) -> RouteSlots:
  """See the module docstring. logits: [T, G + E] float32 (G = num_groups, 0 for
  homogeneous top-K). interpret: the Pallas GPU interpreter (CPU tests). impl: "wgmma"
  (a warpgroup a chunk of 64 tokens in the WGMMA layout), "rows" (`_route_rows`: a
  thread a token) or "triton" (`_route_triton`: two Triton launches over many SMs).
  x [T, D] (impl "triton", D a power of two): the tokens' rows, copied to their slots by
  the second launch (`RouteSlots.slot_x`: the slot block's rows, no gather after)."""
  T, width = logits.shape
  G, K, Kg, C = num_groups, top_k, top_k_groups, capacity
  E = width - G
  if impl not in IMPLS:
    raise ValueError(f"route_slots: impl={impl!r}: must be one of {IMPLS}")
  if x is not None and (impl != "triton" or x.shape[0] != T or x.ndim != 2
                        or x.shape[1] & (x.shape[1] - 1)):
    raise ValueError(f"route_slots: x goes with impl='triton' and must be [T, D] = [{T}, "
                     f"a power of two]; got impl={impl!r}, x {x.shape}")
  reason = unsupported_reason(T, G, E, Kg, K, impl)
  if reason:
    raise ValueError(reason)
  if combine_weights not in COMBINES:
    raise ValueError(f"combine_weights={combine_weights!r}: must be one of {COMBINES}")
  if C < 1:
    raise ValueError(f"capacity must be positive, got {C}")
  if impl == "rows":
    return _route_rows(logits.astype(jnp.float32), G=G, K=K, Kg=Kg, C=C,
                       combine=combine_weights, interpret=interpret)
  if impl == "triton":
    return _route_triton(logits.astype(jnp.float32), x, G=G, K=K, Kg=Kg, C=C,
                         combine=combine_weights, interpret=interpret)
  W = T // ROWS   # warpgroups: one a chunk of tokens
  wg = plgpu.Layout.WGMMA
  row = wg.reduce(1)
  f32, i32, bf16 = jnp.float32, jnp.int32, jnp.bfloat16
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def iota(cols, dim=1):
    return plgpu.broadcasted_iota(i32, (ROWS, cols), dim, layout=wg)

  def across(v, cols):   # a row vector as a [ROWS, cols] tile
    return plgpu.layout_cast(lax.broadcast_in_dim(plgpu.layout_cast(v, row), (ROWS, cols),
                                                  (0,)), wg)

  def top(x, k):
    """The k largest of each row (ties to the lower column): their columns and values
    (row vectors, in falling order) and the 0/1 mask of the chosen columns."""
    col = iota(x.shape[1])
    ids, vals = [], []
    chosen = jnp.zeros(x.shape, jnp.bool_)
    for _ in range(k):
      m = x.max(axis=1)
      idx = jnp.where(x == across(m, x.shape[1]), col, x.shape[1]).min(axis=1)
      hit = col == across(idx, x.shape[1])
      chosen = chosen | hit
      x = jnp.where(hit, -jnp.inf, x)
      ids.append(idx)
      vals.append(m)
    return ids, vals, chosen

  def tile(vs, dtype, fill=0):   # row vectors -> the columns of a [ROWS, COLS] tile
    col = iota(COLS)
    out = jnp.full((ROWS, COLS), fill, dtype)
    out = plgpu.layout_cast(out, wg)
    for j, v in enumerate(vs):
      out = jnp.where(col == j, across(v.astype(dtype), COLS), out)
    return out

  def route(v, u):
    """One chunk's router: expert ids, values (row vectors), the chosen mask and group
    ids (row vectors)."""
    if not G:
      m = v.max(axis=1)
      e = jnp.exp(v - across(m, E))
      probs = e / across(e.sum(axis=1), E)
      ids, vals, chosen = top(probs, K)
      return ids, vals, chosen, [jnp.zeros_like(ids[0])]
    N = E // G
    s = 1.0 / (1.0 + jnp.exp(-u))                       # [ROWS, G] sigmoid
    gids, _, gsel = top(s, Kg)
    masked = jnp.where(gsel, s, 0.0)
    p = masked / across(masked.sum(axis=1), G)
    grp = lax.div(iota(E), N)
    gcol = iota(G)
    vmax = jnp.zeros((ROWS, E), f32)
    vmax = plgpu.layout_cast(vmax, wg)
    for g in range(G):                                   # each group's max, then sum
      mg = jnp.where(grp == g, v, -jnp.inf).max(axis=1)
      vmax = jnp.where(grp == g, across(mg, E), vmax)
    e = jnp.exp(v - vmax)
    r = jnp.zeros((ROWS, E), f32)
    r = plgpu.layout_cast(r, wg)
    for g in range(G):
      sg = jnp.where(grp == g, e, 0.0).sum(axis=1)
      pg = jnp.where(gcol == g, p, 0.0).sum(axis=1)
      r = jnp.where(grp == g, across(pg, E) * (e / across(sg, E)), r)
    r = r / across(r.sum(axis=1), E)
    ids, vals, chosen = top(r, K)
    return ids, vals, chosen, gids

  def kernel(logits_ref, ids_ref, w_ref, slot_ref, gid_ref, sel_smem, lower_smem, ones_smem,
             tot_smem, bar):
    c = lax.axis_index("wg")   # this warpgroup's chunk of tokens
    rowi, col = iota(ROWS, 0), iota(ROWS)
    lower_smem[c] = (col < rowi).astype(bf16)          # strictly lower triangular
    ones_smem[c] = plgpu.layout_cast(jnp.ones((ROWS, ROWS), bf16), wg)
    ecol = iota(E)
    rows = pl.ds(c * ROWS, ROWS)
    v = plgpu.load(logits_ref.at[rows, pl.ds(G, E)], layout=wg, optimized=False)
    u = (plgpu.load(logits_ref.at[rows, pl.ds(0, G)], layout=wg, optimized=False)
         if G else None)
    ids, vals, chosen, gids = route(v, u)
    sel = chosen.astype(f32)
    sel_smem[c] = sel.astype(bf16)
    plgpu.commit_smem()
    if interpret:   # the interpreter's dots (it has no accumulator refs to read back)
      within = jnp.dot(lower_smem[c].astype(f32), sel, preferred_element_type=f32)
      totals = jnp.dot(ones_smem[c].astype(f32), sel, preferred_element_type=f32)
    else:
      def products(acc_w, acc_t):
        plgpu.wgmma(acc_w, lower_smem.at[c], sel_smem.at[c])
        plgpu.wgmma(acc_t, ones_smem.at[c], sel_smem.at[c])
        plgpu.wgmma_wait(0)
        return acc_w[...], acc_t[...]
      within, totals = pl.run_scoped(products, plgpu.ACC((ROWS, E)), plgpu.ACC((ROWS, E)))
    tot_smem[c] = totals.astype(bf16)     # pairs an expert in this chunk (<= 64: exact)
    plgpu.commit_smem()
    plgpu.barrier_arrive(bar)             # every chunk's totals written
    plgpu.barrier_wait(bar)
    before = plgpu.layout_cast(jnp.zeros((ROWS, E), f32), wg)
    for j in range(W - 1):                # the earlier chunks' pairs
      t_j = plgpu.load(tot_smem.at[j], layout=wg, optimized=False).astype(f32)
      before = before + jnp.where(c > j, t_j, 0.0)
    rank = (before + within).astype(i32)
    _write_outputs((ids_ref, w_ref, slot_ref, gid_ref), rows, rank, chosen, ids, vals, gids,
                   C=C, combine=combine_weights, ecol=ecol, across=across, tile=tile)

  return _launch(kernel, logits.astype(jnp.float32), T=T, W=W, G=G, K=K, Kg=Kg, C=C,
                 interpret=interpret,
                 scratch=[plgpu.SMEM((W, ROWS, E), bf16, transforms=transforms),
                          plgpu.SMEM((W, ROWS, ROWS), bf16, transforms=transforms),
                          plgpu.SMEM((W, ROWS, ROWS), bf16, transforms=transforms),
                          plgpu.SMEM((W, ROWS, E), bf16),
                          plgpu.Barrier(num_arrivals=W)])


def _route_rows(logits, *, G: int, K: int, Kg: int, C: int, combine: str, interpret: bool
                ) -> RouteSlots:
  """route_slots with a thread a token: each warpgroup takes 128 tokens (T padded up to a
  multiple of 128, the padding's choices not counted) in `plgpu.Layout.TCGEN05_TMEM_NATIVE`,
  where a thread holds its token's whole row of scores, so the router's reductions (row
  maxima, sums, the top-k's passes) are register-only, and a group's softmax reads that
  group's columns only (the WGMMA layout's kernel spreads a row over four threads and
  masks all 64 columns for each group: ~20k operations issued by every warp, ~30 us on
  the H200, benchmarks/notes_generate.md). The ranks as the WGMMA kernel's: the 0/1
  choices through SMEM into the WGMMA layout, a strictly lower triangular and an all-ones
  product (bf16, exact in float32) per 64-token half, the earlier warpgroups' totals
  through SMEM; back to a thread a token through SMEM for the slots."""
  T, width = logits.shape
  E = width - G
  Tp = -(-T // ROW_TOKENS) * ROW_TOKENS
  W = Tp // ROW_TOKENS
  if Tp != T:
    logits = jnp.pad(logits, ((0, Tp - T), (0, 0)))
  R, H = ROW_TOKENS, ROW_TOKENS // 2   # a warpgroup's tokens, and each half's (wgmma's M)
  L, WG = plgpu.Layout.TCGEN05_TMEM_NATIVE, plgpu.Layout.WGMMA
  f32, i32, bf16 = jnp.float32, jnp.int32, jnp.bfloat16
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def col(n, layout=L, rows=R, dim=1):
    return plgpu.broadcasted_iota(i32, (rows, n), dim, layout=layout)

  def bc(v, n):   # a row vector (a value a thread) as [R, n]
    return lax.broadcast_in_dim(v, (R, n), (0,))

  def top(x, k):
    """The k largest of each row (ties to the lower column): columns and values (row
    vectors, falling) and the 0/1 mask of the chosen columns."""
    n = x.shape[1]
    c = col(n)
    ids, vals, chosen = [], [], c < 0
    for _ in range(k):
      m = x.max(axis=1)
      idx = jnp.where(x == bc(m, n), c, n).min(axis=1)
      hit = c == bc(idx, n)
      chosen = chosen | hit
      x = jnp.where(hit, -jnp.inf, x)
      ids.append(idx)
      vals.append(m)
    return ids, vals, chosen

  def softmax(x):
    e = jnp.exp(x - bc(x.max(axis=1), x.shape[1]))
    return e / bc(e.sum(axis=1), x.shape[1])

  def route(v, u):
    if not G:
      ids, vals, chosen = top(softmax(v), K)
      return ids, vals, chosen, [ids[0] - ids[0]]   # (zeros in the rows' layout)
    N = E // G
    s = 1.0 / (1.0 + jnp.exp(-u))
    gids, _, gsel = top(s, Kg)
    masked = jnp.where(gsel, s, 0.0)
    p = masked / bc(masked.sum(axis=1), G)
    gc = col(G)
    r = jnp.concatenate([bc(jnp.where(gc == g, p, 0.0).sum(axis=1), N)
                         * softmax(v[:, g * N:(g + 1) * N]) for g in range(G)], axis=1)
    r = r / bc(r.sum(axis=1), E)
    ids, vals, chosen = top(r, K)
    return ids, vals, chosen, gids

  def tile(vs, dtype):   # row vectors -> the columns of an [R, COLS] tile
    c = col(COLS)
    out = jnp.where(c < 0, bc(vs[0], COLS), 0).astype(dtype)
    for j, v in enumerate(vs):
      out = jnp.where(c == j, bc(v.astype(dtype), COLS), out)
    return out

  def kernel(logits_ref, ids_ref, w_ref, slot_ref, gid_ref, plain_smem, sel_sw, lower_sw,
             ones_sw, tot_smem, bar):
    c = lax.axis_index("wg")   # this warpgroup's 128 tokens
    rows = pl.ds(c * R, R)
    v = plgpu.load(logits_ref.at[rows, pl.ds(G, E)], layout=L, optimized=False)
    u = (plgpu.load(logits_ref.at[rows, pl.ds(0, G)], layout=L, optimized=False)
         if G else None)
    ids, vals, chosen, gids = route(v, u)
    chosen = chosen & (col(E, dim=0) + c * R < T)   # the padding's tokens choose nothing
    # The choices into the WGMMA layout (through SMEM), bf16 for the products.
    plain = plain_smem.at[c, :, pl.ds(0, E)]   # rows padded by 2: conflict-free by rows
    plain[...] = chosen.astype(f32)
    plgpu.commit_smem()
    halves = [plgpu.load(plain.at[pl.ds(h * H, H)], layout=WG, optimized=False)
              for h in range(2)]
    for h in range(2):
      sel_sw[c, h] = halves[h].astype(bf16)
    r_wg, c_wg = col(H, WG, H, 0), col(H, WG, H, 1)
    lower_sw[c] = (c_wg < r_wg).astype(bf16)          # strictly lower triangular
    ones_sw[c] = (c_wg >= 0).astype(bf16)
    plgpu.commit_smem()
    if interpret:   # the interpreter's dots (it has no accumulator refs to read back)
      lo, ones = lower_sw[c].astype(f32), ones_sw[c].astype(f32)
      dot = lambda a, b: jnp.dot(a, b, preferred_element_type=f32)  # noqa: E731
      within = [dot(lo, halves[0]), dot(ones, halves[0]) + dot(lo, halves[1])]
      totals = dot(ones, halves[0]) + dot(ones, halves[1])
    else:
      def products(acc0, acc1, acc_t):
        plgpu.wgmma(acc0, lower_sw.at[c], sel_sw.at[c, 0])
        plgpu.wgmma(acc1, ones_sw.at[c], sel_sw.at[c, 0])
        plgpu.wgmma(acc1, lower_sw.at[c], sel_sw.at[c, 1])
        plgpu.wgmma(acc_t, ones_sw.at[c], sel_sw.at[c, 0])
        plgpu.wgmma(acc_t, ones_sw.at[c], sel_sw.at[c, 1])
        plgpu.wgmma_wait(0)
        return [acc0[...], acc1[...]], acc_t[...]
      within, totals = pl.run_scoped(products, *[plgpu.ACC((H, E)) for _ in range(3)])
    tot_smem[c] = totals                    # every row: this warpgroup's pairs an expert
    plgpu.commit_smem()
    plgpu.barrier_arrive(bar)               # every warpgroup's totals written
    plgpu.barrier_wait(bar)
    before = jnp.zeros((H, E), f32)
    for j in range(W - 1):                  # the earlier warpgroups' pairs
      t_j = plgpu.load(tot_smem.at[j], layout=WG, optimized=False)
      before = before + jnp.where(c > j, t_j, 0.0)
    for h in range(2):                      # the ranks back to a thread a token
      plain.at[pl.ds(h * H, H)][...] = within[h] + before
    plgpu.commit_smem()
    rank = plgpu.load(plain, layout=L, optimized=True).astype(i32)
    _write_outputs((ids_ref, w_ref, slot_ref, gid_ref), rows, rank, chosen, ids, vals, gids,
                   C=C, combine=combine, ecol=col(E), across=bc, tile=tile)

  return _launch(kernel, logits, T=T, W=W, G=G, K=K, Kg=Kg, C=C, interpret=interpret,
                 scratch=[plgpu.SMEM((W, R, E + 2), f32),
                          plgpu.SMEM((W, 2, H, E), bf16, transforms=transforms),
                          plgpu.SMEM((W, H, H), bf16, transforms=transforms),
                          plgpu.SMEM((W, H, H), bf16, transforms=transforms),
                          plgpu.SMEM((W, H, E), f32),
                          plgpu.Barrier(num_arrivals=W)])


# ----------------------------------------------------------------------------- impl="triton"


def _triton_unsupported_reason(T, G, E, Kg, K) -> str | None:
  pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
  if not 1 <= T <= MAX_TRITON_TOKENS:
    return f"route kernel (impl='triton'): tokens must be 1..{MAX_TRITON_TOKENS}, got {T}"
  if not pow2(E) or E < 16:
    return f"route kernel (impl='triton'): experts must be a power of two >= 16, got {E}"
  if not 1 <= K <= COLS:
    return f"route kernel (impl='triton'): top_k must be 1..{COLS}, got {K}"
  if G and (not pow2(G) or E % G or not 1 <= Kg <= min(G, COLS)):
    return (f"route kernel (impl='triton'): two-level routing needs a power-of-two number "
            f"of groups dividing the experts and 1 <= top_k_groups <= min(groups, {COLS}); "
            f"got {G} groups of {E} experts, top_k_groups={Kg}")
  return None


def _triton_top(x, k):
  """The k largest of each row of x [rows, n] (ties to the lower column): their columns and
  values (row vectors, falling) and the chosen columns' mask."""
  n = x.shape[1]
  col = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  ids, vals, chosen = [], [], col < 0
  for _ in range(k):
    m = x.max(axis=1)
    idx = jnp.where(x == m[:, None], col, n).min(axis=1)
    hit = col == idx[:, None]
    chosen = chosen | hit
    x = jnp.where(hit, -jnp.inf, x)
    ids.append(idx)
    vals.append(m)
  return ids, vals, chosen


def _triton_tile(vs, dtype):
  """Row vectors -> the first columns of a [rows, COLS] tile (zeros after)."""
  col = lax.broadcasted_iota(jnp.int32, (vs[0].shape[0], COLS), 1)
  out = jnp.zeros(col.shape, dtype)
  for j, v in enumerate(vs):
    out = jnp.where(col == j, v.astype(dtype)[:, None], out)
  return out


def _triton_column(tile, j):
  """Column j of a [rows, COLS] tile as a row vector."""
  col = lax.broadcasted_iota(jnp.int32, tile.shape, 1)
  return jnp.where(col == j, tile, 0).sum(axis=1)


def _triton_route_kernel(logits_ref, ids_ref, w_ref, gid_ref, rank_ref, count_ref, *, B, T,
                         G, E, K, Kg, combine):
  """Program i routes tokens [B i, B i + B): the router's float32 math as
  `routing.two_level_route` / `topk_route` do it (the top-K read from p * q, its values
  divided by the row sum after), each pair's rank among this program's pairs of its expert
  (an exclusive cumsum of the 0/1 choices down the tokens) and this program's pairs an
  expert."""
  i = pl.program_id(0)
  rows = pl.ds(i * B, B)
  v = logits_ref[rows, pl.ds(G, E)]                                   # [B, E]
  ecol = lax.broadcasted_iota(jnp.int32, (B, E), 1)
  if G:
    N = E // G
    u = logits_ref[rows, pl.ds(0, G)]                                 # [B, G]
    s = 1.0 / (1.0 + jnp.exp(-u))
    gids, _, gsel = _triton_top(s, Kg)
    masked = jnp.where(gsel, s, 0.0)
    p = masked / masked.sum(axis=1)[:, None]
    gcol = lax.broadcasted_iota(jnp.int32, (B, G), 1)
    grp = ecol // N
    vmax = jnp.zeros((B, E), jnp.float32)
    for g in range(G):   # each group's softmax by masking its columns
      vmax = jnp.where(grp == g, jnp.where(grp == g, v, -jnp.inf).max(axis=1)[:, None], vmax)
    e = jnp.exp(v - vmax)
    pq = jnp.zeros((B, E), jnp.float32)
    for g in range(G):
      sum_g = jnp.where(grp == g, e, 0.0).sum(axis=1)
      p_g = jnp.where(gcol == g, p, 0.0).sum(axis=1)
      pq = jnp.where(grp == g, p_g[:, None] * (e / sum_g[:, None]), pq)
    ids, vals, chosen = _triton_top(pq, K)
    total = pq.sum(axis=1)
    vals = [x / total for x in vals]
  else:
    e = jnp.exp(v - v.max(axis=1)[:, None])
    ids, vals, chosen = _triton_top(e / e.sum(axis=1)[:, None], K)
    gids = [ids[0] * 0]
  token = i * B + lax.broadcasted_iota(jnp.int32, (B, E), 0)
  chosen_i = (chosen & (token < T)).astype(jnp.int32)   # the padding's tokens choose nothing
  before = jnp.cumsum(chosen_i, axis=0) - chosen_i      # this program's earlier pairs
  ranks = [jnp.where(ecol == x[:, None], before, 0).sum(axis=1) for x in ids]
  ids_ref[rows, :] = _triton_tile(ids, jnp.int32)
  w_ref[rows, :] = _triton_tile(_combine(vals, combine), jnp.float32)
  gid_ref[rows, :] = _triton_tile(gids, jnp.int32)
  rank_ref[rows, :] = _triton_tile(ranks, jnp.int32)
  count_ref[i, :] = chosen_i.sum(axis=0)


def _triton_slots_kernel(ids_ref, rank_ref, count_ref, *refs, B, P, E, K, C, with_x):
  """Program i's pairs' slots: e * C + min(rank, C - 1), the rank being the pair's rank in
  its program plus the earlier programs' pairs of its expert (every program's counts are
  read; rows of count_ref from P on are not written and are masked); each pair's token
  (with_x: and its row of x) stored at its slot (ranks past C - 1 store nothing); program
  0 also writes each expert's pairs and the most pairs any expert got."""
  if with_x:
    x_ref, slot_ref, tok_ref, max_ref, total_ref, xs_ref = refs
  else:
    slot_ref, tok_ref, max_ref, total_ref = refs
  i = pl.program_id(0)
  rows = pl.ds(i * B, B)
  counts = count_ref[...]                                             # [Pp, E]
  prog = lax.broadcasted_iota(jnp.int32, counts.shape, 0)
  before_E = jnp.where(prog < i, counts, 0).sum(axis=0)
  ids, ranks = ids_ref[rows, :], rank_ref[rows, :]
  ecol = lax.broadcasted_iota(jnp.int32, (B, E), 1)
  slots, fits = [], []
  for j in range(K):
    e_j = _triton_column(ids, j)
    rank_j = _triton_column(ranks, j) + jnp.where(ecol == e_j[:, None], before_E[None, :],
                                                  0).sum(axis=1)
    slots.append(e_j * C + jnp.minimum(rank_j, C - 1))
    fits.append(rank_j < C)
  slot_BxCOLS = _triton_tile(slots, jnp.int32)
  slot_ref[rows, :] = slot_BxCOLS
  # Each pair's token at its slot. Masked lanes (ranks past C - 1, the tile's spare
  # columns) get distinct spill places past E * C: the GPU's masked store writes nothing,
  # the interpreter's writes the old value back at the lane's index.
  lane = lax.broadcasted_iota(jnp.int32, slot_BxCOLS.shape, 0) * COLS + lax.broadcasted_iota(
      jnp.int32, slot_BxCOLS.shape, 1)
  store = _triton_tile(fits, jnp.int32) != 0
  token = i * B + lax.broadcasted_iota(jnp.int32, slot_BxCOLS.shape, 0)
  plt.store(tok_ref.at[jnp.where(store, slot_BxCOLS, E * C + lane)], token, mask=store)
  if with_x:   # the tokens' rows to their pairs' slots (spill rows as above)
    x_BxD = x_ref[rows, :]
    D = x_BxD.shape[1]
    col_D = lax.broadcasted_iota(jnp.int32, (B, D), 1)
    row_B = lax.broadcasted_iota(jnp.int32, (B,), 0)
    for j in range(K):
      ok_B = fits[j]
      dest_B = jnp.where(ok_B, slots[j], E * C + row_B)
      plt.store(xs_ref.at[dest_B[:, None], col_D], x_BxD,
                mask=jnp.broadcast_to(ok_B[:, None], (B, D)))

  @pl.when(i == 0)
  def _():
    total_E = jnp.where(prog < P, counts, 0).sum(axis=0)
    total_ref[...] = total_E
    max_ref[...] = jnp.full((1,), total_E.max(), jnp.int32)


def _route_triton(logits, x, *, G: int, K: int, Kg: int, C: int, combine: str,
                  interpret: bool) -> RouteSlots:
  """route_slots over many SMs: a program (thread block) of a few tokens (`triton_tile`)
  routes them and counts its pairs an expert; a second launch turns the counts into slots.
  Why: the Mosaic GPU kernels above run every token in one thread block (~30 us a
  MoHGE-3B layer on the H200, issue-bound), XLA's routing chain is ~10 launches (~25 us);
  here 64 programs of a [4, 64] tile each at batch 256 (1 warp, 8 values a thread), two
  launches. Pallas' Triton backend: the ranks are a cumsum down the tokens, which Mosaic
  GPU's Pallas lowering does not have (jax 0.11.2; `indexer_gpu` says more)."""
  T = logits.shape[0]
  E = logits.shape[1] - G
  B, warps = triton_tile(T)
  P = -(-T // B)
  Pp = 1 << (P - 1).bit_length()   # the counts' rows, a power of two (Triton's blocks)
  Tp = P * B
  if Tp != T:
    logits = jnp.pad(logits, ((0, Tp - T), (0, 0)))
    x = None if x is None else jnp.pad(x, ((0, Tp - T), (0, 0)))
  ints = jax.ShapeDtypeStruct((Tp, COLS), jnp.int32)
  # The interpreter's masked stores write at the masked lanes' (spill) places too; on the
  # GPU they write nothing, and the slot rows are exactly [E * C, D] (no copy to slice).
  spill = B if interpret else 0
  params = plt.CompilerParams(num_warps=warps, num_stages=1)
  ids8, w8, gid8, rank8, counts = pl.pallas_call(
      functools.partial(_triton_route_kernel, B=B, T=T, G=G, E=E, K=K, Kg=Kg, combine=combine),
      grid=(P,), compiler_params=params, interpret=interpret, name="route_tokens",
      out_shape=(ints, jax.ShapeDtypeStruct((Tp, COLS), jnp.float32), ints, ints,
                 jax.ShapeDtypeStruct((Pp, E), jnp.int32)))(logits)
  out_shape = (ints, jax.ShapeDtypeStruct((E * C + B * COLS,), jnp.int32),
               jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((E,), jnp.int32))
  if x is not None:
    out_shape += (jax.ShapeDtypeStruct((E * C + spill, x.shape[1]), x.dtype),)
  slot8, tokens, over, totals, *xs = pl.pallas_call(
      functools.partial(_triton_slots_kernel, B=B, P=P, E=E, K=K, C=C, with_x=x is not None),
      grid=(P,), compiler_params=params, interpret=interpret, name="route_slots",
      out_shape=out_shape)(ids8, rank8, counts, *([] if x is None else [x]))
  return RouteSlots(expert_ids=ids8[:T, :K], weights=w8[:T, :K],
                    group_ids=gid8[:T, :Kg] if G else jnp.zeros((T, 1), jnp.int32),
                    slots=slot8[:T, :K], overflow=over[0] > C,
                    slot_tokens=tokens[:E * C], counts=totals,
                    slot_x=xs[0][:E * C] if xs else None, max_count=over)


def reference(logits, *, num_groups: int, top_k_groups: int, top_k: int,
              combine_weights: str, capacity: int) -> RouteSlots:
  """The same in plain JAX: `routing.two_level_route` / `topk_route` and the ranks of
  `dispatch._capacity_slots`."""
  from mohge_jax import routing   # noqa: PLC0415 - pallas_kernels does not need the library
  G, C = num_groups, capacity
  logits = logits.astype(jnp.float32)
  T, E = logits.shape[0], logits.shape[1] - G
  if G:
    r = routing.two_level_route(logits[:, :G], logits[:, G:], num_groups=G,
                                top_k_groups=top_k_groups, top_k=top_k,
                                combine_weights=combine_weights)
  else:
    r = routing.topk_route(logits, top_k=top_k, combine_weights=combine_weights)
  ids_M = r.expert_ids.reshape(-1)
  onehot_MxE = (ids_M[:, None] == jnp.arange(E)).astype(jnp.int32)
  rank_M = jnp.sum(jnp.cumsum(onehot_MxE, axis=0) * onehot_MxE, axis=1) - 1
  slots = (ids_M * C + jnp.minimum(rank_M, C - 1)).reshape(T, top_k)
  return RouteSlots(r.expert_ids, r.weights, r.group_ids, slots.astype(jnp.int32),
                    jnp.max(rank_M) >= C)
