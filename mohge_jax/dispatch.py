"""The experts' computation on one device: the grouped SwiGLU FFN over rows sorted by
expert (`grouped_ffn`, the one backend-choosing function, and its backends) and the dispatch
around it (sort the token-expert pairs by expert, run, unsort, combine).

Used by the routed layer (`experts.RoutedFFN`) and by its expert-parallel form
(`expert_parallel`), which runs `grouped_ffn` on each device's share between two exchanges.
Imports neither: the layer imports both, and expert_parallel imports this.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mohge_jax import routing

BACKENDS = ("reference", "ragged_dot", "tiled", "pallas", "per_expert")


def swiglu(h_MxF2: jax.Array) -> jax.Array:
  """silu(gate) * up for fused [..., 2W] activations (gate first)."""
  gate, up = jnp.split(h_MxF2, 2, axis=-1)
  return jax.nn.silu(gate) * up


def _group_row_spans(group_sizes_E: jax.Array, num_groups: int):
  """Start row and per-expert sizes of each group's contiguous block of sorted rows."""
  N = group_sizes_E.shape[0] // num_groups
  ends_E = jnp.cumsum(group_sizes_E)
  starts_E = ends_E - group_sizes_E
  return [(starts_E[g * N], group_sizes_E[g * N:(g + 1) * N]) for g in range(num_groups)]


def _ffn_reference(x_MxD, group_sizes_E, w_gate_up, w_down):
  """Every row against every expert of each group, then keep its own expert's result.

  Simple and obviously right; N times the FLOPs. For tests and tiny models.
  """
  M = x_MxD.shape[0]
  N = w_gate_up[0].shape[0]
  ends_E = jnp.cumsum(group_sizes_E)
  expert_of_row_M = jnp.searchsorted(ends_E, jnp.arange(M), side="right")  # E for padding
  y_MxD = jnp.zeros((M, x_MxD.shape[1]), jnp.float32)
  for g, (wgu_NxDxF2, wd_NxFxD) in enumerate(zip(w_gate_up, w_down)):
    local_M = expert_of_row_M - g * N
    in_group_M = (local_M >= 0) & (local_M < N)
    onehot_MxN = jax.nn.one_hot(jnp.where(in_group_M, local_M, -1), N, dtype=x_MxD.dtype)
    h_MxNxF2 = jnp.einsum("md,ndf->mnf", x_MxD, wgu_NxDxF2, preferred_element_type=jnp.float32)
    a_MxNxF = swiglu(h_MxNxF2).astype(x_MxD.dtype) * onehot_MxN[:, :, None]
    y_MxD += jnp.einsum("mnf,nfd->md", a_MxNxF, wd_NxFxD, preferred_element_type=jnp.float32)
  return y_MxD.astype(x_MxD.dtype)


def _ffn_ragged_dot(x_MxD, group_sizes_E, w_gate_up, w_down):
  """`jax.lax.ragged_dot` per group: roll the group's rows to the front, two ragged matmuls."""
  y_MxD = jnp.zeros(x_MxD.shape, jnp.float32)
  for (start, sizes_N), wgu_NxDxF2, wd_NxFxD in zip(
      _group_row_spans(group_sizes_E, len(w_gate_up)), w_gate_up, w_down):
    x_g_MxD = jnp.roll(x_MxD, -start, axis=0)
    h_MxF2 = jax.lax.ragged_dot(x_g_MxD, wgu_NxDxF2, sizes_N,
                                preferred_element_type=jnp.float32)
    a_MxF = swiglu(h_MxF2).astype(x_MxD.dtype)
    o_MxD = jax.lax.ragged_dot(a_MxF, wd_NxFxD, sizes_N, preferred_element_type=jnp.float32)
    y_MxD += jnp.roll(o_MxD, start, axis=0)
  return y_MxD.astype(x_MxD.dtype)


def _pad_to_width(w_gate_up, w_down, width: int):
  """Zero-pad every group's experts to `width` (gate and up halves separately): the padded
  columns give silu(0) * 0 = 0, so results are exact."""
  gu, dn = [], []
  for wgu_NxDxF2, wd_NxFxD in zip(w_gate_up, w_down):
    pad = width - wd_NxFxD.shape[1]
    gate, up = jnp.split(wgu_NxDxF2, 2, axis=-1)
    gu.append(jnp.pad(jnp.concatenate([jnp.pad(gate, ((0, 0), (0, 0), (0, pad))),
                                       jnp.pad(up, ((0, 0), (0, 0), (0, pad)))], -1), 0))
    dn.append(jnp.pad(wd_NxFxD, ((0, 0), (0, pad), (0, 0))))
  return jnp.concatenate(gu), jnp.concatenate(dn)  # [E, D, 2*width], [E, width, D]


def _ffn_tiled(x_MxD, group_sizes_E, w_gate_up, w_down, tile: int = 128,
               items_per_chunk: int = 128):
  """Block-sparse pure JAX: row tiles x experts as batched dense matmuls.

  Every (row tile, expert) pair that overlaps is one work item (at most M/tile + E of
  them, as megablox counts them); each multiplies its tile by its expert's weights, masked
  to the expert's rows. Weights are zero-padded to the widest group, so it does about
  W_max/W_mean times the ideal FLOPs: a portable fallback (CPU, non-Hopper GPUs) that runs
  at dense-matmul speed, unlike XLA's ragged_dot. Each item needs its own copy of its
  expert's weights, so items run `items_per_chunk` at a time (a loop over chunks, each
  recomputed in the backward pass): memory holds one chunk's weight copies, not every
  item's (at MoHGE-3B's 786k routed rows that would be 6,207 copies, 49 GB).
  """
  M, D = x_MxD.shape
  E = group_sizes_E.shape[0]
  width = max(w.shape[1] for w in w_down)
  wgu_ExDxF2, wd_ExFxD = _pad_to_width(w_gate_up, w_down, width)
  num_tiles = -(-M // tile)
  items = num_tiles + E - 1  # static bound on overlapping (tile, expert) pairs
  chunks = -(-items // items_per_chunk)
  items = chunks * items_per_chunk if chunks > 1 else items

  ends_E = jnp.cumsum(group_sizes_E)
  starts_E = ends_E - group_sizes_E
  first_tile_E = starts_E // tile
  tiles_E = jnp.where(group_sizes_E > 0, (ends_E - 1) // tile - first_tile_E + 1, 0)
  item_end_E = jnp.cumsum(tiles_E)
  item_I = jnp.arange(items)
  expert_I = jnp.minimum(jnp.searchsorted(item_end_E, item_I, side="right"), E - 1)
  tile_I = first_tile_E[expert_I] + item_I - (item_end_E[expert_I] - tiles_E[expert_I])
  valid_I = item_I < item_end_E[-1]
  rows_IxT = jnp.clip(tile_I, 0, num_tiles - 1)[:, None] * tile + jnp.arange(tile)
  mask_IxT = (valid_I[:, None] & (rows_IxT >= starts_E[expert_I][:, None])
              & (rows_IxT < ends_E[expert_I][:, None]))
  x_pad = jnp.pad(x_MxD, ((0, num_tiles * tile - M), (0, 0)))

  def run_items(expert_I, rows_IxT, mask_IxT):
    x_IxTxD = x_pad[rows_IxT]
    # Matmuls in x's dtype (float32 accumulation inside): a float32 output would make the
    # backward matmuls float32 x bf16 (slow TF32 GEMMs on GPUs).
    h_IxTxF2 = jnp.einsum("itd,idf->itf", x_IxTxD, wgu_ExDxF2[expert_I])
    a_IxTxF = (swiglu(h_IxTxF2.astype(jnp.float32)) * mask_IxT[..., None]).astype(x_MxD.dtype)
    return jnp.einsum("itf,ifd->itd", a_IxTxF, wd_ExFxD[expert_I])

  if chunks == 1:
    o_IxTxD = run_items(expert_I, rows_IxT, mask_IxT)
  else:
    in_chunks = lambda a: a.reshape(chunks, items_per_chunk, *a.shape[1:])  # noqa: E731
    o_CxIxTxD = jax.lax.map(lambda args: jax.checkpoint(run_items)(*args),
                            (in_chunks(expert_I), in_chunks(rows_IxT), in_chunks(mask_IxT)))
    o_IxTxD = o_CxIxTxD.reshape(items, tile, D)
  y_MxD = jnp.zeros((num_tiles * tile, D), jnp.float32).at[rows_IxT].add(
      o_IxTxD.astype(jnp.float32))
  return y_MxD[:M].astype(x_MxD.dtype)


def _expert_tiles(x_MxD, group_sizes_E, num_groups, tile, visit, carry):
  """Visits experts one at a time (groups unrolled, experts and row tiles in device loops),
  calling `carry = visit(g, n, row0, valid_Tx1, carry)` per tile of `tile` rows."""
  N = group_sizes_E.shape[0] // num_groups
  starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  for g in range(num_groups):
    def expert(n, carry, g=g):
      start, size = starts_E[g * N + n], group_sizes_E[g * N + n]

      def one_tile(i_carry):
        i, carry = i_carry
        valid_Tx1 = (jnp.arange(tile) < size - i * tile)[:, None]
        return i + 1, visit(g, n, start + i * tile, valid_Tx1, carry)

      _, carry = jax.lax.while_loop(lambda ic: ic[0] * tile < size, one_tile, (0, carry))
      return carry
    carry = jax.lax.fori_loop(0, N, expert, carry)
  return carry


def _swiglu_expert(x_TxD, wgu_DxF2, wd_FxD):
  h_TxF2 = jnp.dot(x_TxD, wgu_DxF2, preferred_element_type=jnp.float32)
  return jnp.dot(swiglu(h_TxF2).astype(x_TxD.dtype), wd_FxD, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _ffn_per_expert(x_MxD, group_sizes_E, w_gate_up, w_down):
  """The paper's reference computes experts one at a time; this does the same on the
  device (a loop over experts, each over its row tiles), as the contrast in benchmarks.
  Exact and dropless; its backward pass loops the same way (custom VJP: while loops with
  data-dependent trip counts cannot be reverse-differentiated)."""
  return _per_expert_fwd(x_MxD, group_sizes_E, w_gate_up, w_down)[0]


_TILE = 128


def _per_expert_fwd(x_MxD, group_sizes_E, w_gate_up, w_down):
  M, D = x_MxD.shape
  x_pad = jnp.pad(x_MxD, ((0, _TILE), (0, 0)))

  def visit(g, n, row0, valid_Tx1, y):
    x_TxD = jax.lax.dynamic_slice_in_dim(x_pad, row0, _TILE)
    o_TxD = _swiglu_expert(x_TxD, w_gate_up[g][n], w_down[g][n])
    old = jax.lax.dynamic_slice_in_dim(y, row0, _TILE)
    return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(valid_Tx1, o_TxD, old), row0, 0)

  y = _expert_tiles(x_MxD, group_sizes_E, len(w_gate_up), _TILE, visit,
                    jnp.zeros((M + _TILE, D), jnp.float32))
  return y[:M].astype(x_MxD.dtype), (x_MxD, group_sizes_E, w_gate_up, w_down)


def _per_expert_bwd(res, dy_MxD):
  x_MxD, group_sizes_E, w_gate_up, w_down = res
  x_pad = jnp.pad(x_MxD, ((0, _TILE), (0, 0)))
  dy_pad = jnp.pad(dy_MxD, ((0, _TILE), (0, 0)))

  def visit(g, n, row0, valid_Tx1, grads):
    dx, dwgu, dwd = grads
    x_TxD = jax.lax.dynamic_slice_in_dim(x_pad, row0, _TILE)
    dy_TxD = jnp.where(valid_Tx1, jax.lax.dynamic_slice_in_dim(dy_pad, row0, _TILE), 0)
    _, vjp = jax.vjp(_swiglu_expert, x_TxD, w_gate_up[g][n], w_down[g][n])
    dx_t, dwgu_n, dwd_n = vjp(dy_TxD.astype(jnp.float32))
    old = jax.lax.dynamic_slice_in_dim(dx, row0, _TILE)
    dx = jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(valid_Tx1, dx_t, old), row0, 0)
    dwgu = [a.at[n].add(dwgu_n) if i == g else a for i, a in enumerate(dwgu)]
    dwd = [a.at[n].add(dwd_n) if i == g else a for i, a in enumerate(dwd)]
    return dx, dwgu, dwd

  zeros = lambda ws: [jnp.zeros(w.shape, jnp.float32) for w in ws]
  dx, dwgu, dwd = _expert_tiles(
      x_MxD, group_sizes_E, len(w_gate_up), _TILE, visit,
      (jnp.zeros((x_MxD.shape[0] + _TILE, x_MxD.shape[1]), jnp.float32), zeros(w_gate_up),
       zeros(w_down)))
  cast = lambda grads, ws: tuple(d.astype(w.dtype) for d, w in zip(grads, ws))
  return (dx[:x_MxD.shape[0]].astype(x_MxD.dtype), None, cast(dwgu, w_gate_up),
          cast(dwd, w_down))


_ffn_per_expert.defvjp(_per_expert_fwd, _per_expert_bwd)


def _ffn_pallas(x_MxD, group_sizes_E, w_gate_up, w_down, zero_padding=True):
  try:
    import pallas_kernels
  except ImportError as e:  # pragma: no cover - the package ships with the library
    raise RuntimeError("expert_backend='pallas' needs the pallas_kernels package") from e
  tuning = {} if zero_padding else {"zero_padding": False}
  return pallas_kernels.expert_ffn(x_MxD, group_sizes_E, tuple(w_gate_up), tuple(w_down),
                                   **tuning)


def resolve_backend(backend: str, widths: Sequence[int] = (), d_model: int = 0) -> str:
  """'auto': the Pallas kernels on Hopper GPUs and TPUs when they support these shapes,
  `tiled` elsewhere. An explicit 'pallas' that cannot run these shapes is an error."""
  if backend not in BACKENDS + ("auto",):
    raise ValueError(f"expert backend {backend!r}: must be auto or one of {', '.join(BACKENDS)}")
  if backend not in ("auto", "pallas"):
    return backend
  if jax.default_backend() == "cpu":
    if backend == "pallas":
      return backend  # the kernels' own dispatch falls back to their reference on CPU
    return "tiled"
  import pallas_kernels
  if pallas_kernels.resolve_backend("auto") == "reference":
    return "tiled" if backend == "auto" else backend
  reason = pallas_kernels.unsupported_reason(widths, d_model) if widths else None
  if reason and backend == "pallas":
    raise ValueError(f"model.expert_backend=pallas: {reason}")
  if reason:
    warnings.warn(f"expert backend 'auto' uses 'tiled': {reason}", stacklevel=2)
    return "tiled"
  return "pallas"


def grouped_ffn(x_MxD: jax.Array, group_sizes_E: jax.Array, w_gate_up: Sequence[jax.Array],
                w_down: Sequence[jax.Array], *, backend: str = "auto",
                zero_padding: bool = True) -> jax.Array:
  """SwiGLU experts of every width over rows sorted by expert (group-major).

  x_MxD: rows sorted by expert; group_sizes_E: int32 rows per expert (sum <= M, later rows
  are padding and give 0); w_gate_up[g]: [N, D, 2*W_g] (gate columns first); w_down[g]:
  [N, W_g, D]. Returns [M, D] in x's dtype, accumulated in float32.

  zero_padding=False: the padding rows of the output and of x's gradient may be left
  undefined (the Pallas GPU kernels then skip them; the other backends still give 0), for
  callers that mask them (`expert_parallel._local_ffn`).
  """
  widths = [w.shape[1] for w in w_down]
  name = resolve_backend(backend, widths, x_MxD.shape[1])
  if name == "pallas":
    return _ffn_pallas(x_MxD, group_sizes_E, tuple(w_gate_up), tuple(w_down), zero_padding)
  fn = {"reference": _ffn_reference, "ragged_dot": _ffn_ragged_dot, "tiled": _ffn_tiled,
        "per_expert": _ffn_per_expert}[name]
  return fn(x_MxD, group_sizes_E, tuple(w_gate_up), tuple(w_down))


def inverse_permutation(order_M: jax.Array) -> jax.Array:
  """inv with inv[order[i]] = i: gathering through it undoes the gather through `order`."""
  return jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))


@jax.custom_vjp
def permute_rows(x_MxD: jax.Array, order_M: jax.Array, inverse_M: jax.Array) -> jax.Array:
  """x[order] for a permutation `order` with inverse `inverse`. Its backward pass is the
  gather g[inverse]; autodiff of a plain gather cannot know the indices are a permutation
  and emits a scatter-add (atomics), which cost ~7% of a MoHGE-3B step on the H200."""
  return x_MxD[order_M]


def _permute_fwd(x_MxD, order_M, inverse_M):
  return x_MxD[order_M], (order_M, inverse_M)


def _permute_bwd(res, g_MxD):
  order_M, inverse_M = res
  return g_MxD[inverse_M], None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


# The most bins `count_ids` counts with a one-hot sum. On the H200 (jax 0.11.2) the one-hot
# reduction s32[786432, 128] -> [128] did not finish compiling in 4 minutes (XLA's
# "Very slow compile" alarm on that one fusion), where 64 bins compile in seconds.
ONE_HOT_MAX_BINS = 64


def count_ids(ids: jax.Array, num: int) -> jax.Array:
  """How many entries of `ids` equal each of 0..num-1: int32 [num]; ids outside are not
  counted. Up to ONE_HOT_MAX_BINS bins a one-hot sum (one fused reduction) rather than a
  scatter-add, whose atomics on few bins serialise on GPUs; above, from the sorted ids
  (a sort and num+1 binary searches)."""
  ids = ids.reshape(-1)
  if num <= ONE_HOT_MAX_BINS:
    return jnp.sum(ids[:, None] == jnp.arange(num, dtype=ids.dtype), axis=0, dtype=jnp.int32)
  edges = jnp.searchsorted(jnp.sort(ids), jnp.arange(num + 1, dtype=ids.dtype),
                           method="scan_unrolled")  # edges[i]: how many ids are below i
  return jnp.diff(edges).astype(jnp.int32)


def combine(y_TxKxD: jax.Array, weights_TxK: jax.Array) -> jax.Array:
  """sum_k weights[t, k] * y[t, k] in float32 [T, D]. Written as a multiply and a sum (one
  fused memory-bound pass), not an einsum: that is a dot with batch dimension T, which GPUs
  run as T tiny batched GEMMs."""
  return jnp.sum(y_TxKxD.astype(jnp.float32) * weights_TxK[..., None], axis=1)


def dispatch_and_combine(x_TxD, expert_ids_TxK, weights_TxK, w_gate_up, w_down,
                         num_experts: int, *, backend: str) -> jax.Array:
  """Sort the T*K token-expert pairs by expert, run the grouped experts, unsort (gather
  through the inverse permutation), weight and sum over K. Float32 [T, D]."""
  T, K = expert_ids_TxK.shape
  expert_of_pair_M = expert_ids_TxK.reshape(T * K)
  order_M = jnp.argsort(expert_of_pair_M, stable=True)
  inverse_M = inverse_permutation(order_M)
  group_sizes_E = count_ids(expert_of_pair_M, num_experts)
  x_sorted_MxD = permute_rows(jnp.repeat(x_TxD, K, axis=0), order_M, inverse_M)
  y_sorted_MxD = grouped_ffn(x_sorted_MxD, group_sizes_E, w_gate_up, w_down, backend=backend)
  y_TxKxD = permute_rows(y_sorted_MxD, inverse_M, order_M).reshape(T, K, -1)
  return combine(y_TxKxD, weights_TxK)


def all_experts(x_TxD, expert_ids_TxK, weights_TxK, w_gate_up, w_down) -> jax.Array:
  """Every token through every expert, each expert's output weighted by the token's combine
  weight for it (0 where not routed there): float32 [T, D], the value of
  `dispatch_and_combine`. E/K times the routed FLOPs, but no sort and each expert's weights
  read once, in their stored layout (per group a matmul batched over its N experts, then
  one over experts and width together): for decoding's few tokens, which hit most experts
  anyway and are bound by reading the weights, not by FLOPs."""
  T, D = x_TxD.shape
  E = sum(w.shape[0] for w in w_gate_up)
  weights_TxE = jnp.sum(jax.nn.one_hot(expert_ids_TxK, E, dtype=jnp.float32)
                        * weights_TxK[..., None].astype(jnp.float32), axis=1)
  y_TxD = jnp.zeros((T, D), jnp.float32)
  first = 0
  for wgu_NxDxF2, wd_NxFxD in zip(w_gate_up, w_down):
    N = wgu_NxDxF2.shape[0]
    x_NxTxD = jnp.broadcast_to(x_TxD, (N, T, D))
    h_NxTxF2 = jnp.einsum("ntd,ndf->ntf", x_NxTxD, wgu_NxDxF2)
    w_NxTx1 = weights_TxE[:, first:first + N].T[:, :, None]
    a_NxTxF = (swiglu(h_NxTxF2.astype(jnp.float32)) * w_NxTx1).astype(x_TxD.dtype)
    y_TxD += jnp.einsum("ntf,nfd->td", a_NxTxF, wd_NxFxD, preferred_element_type=jnp.float32)
    first += N
  return y_TxD


def expert_capacity(T: int, K: int, E: int, capacity_factor: float = 2.0,
                    min_capacity: int = 8) -> int:
  """`capacity_experts`' rows per expert: capacity_factor x T*K/E rounded up, at least
  min_capacity, at most T."""
  return int(min(T, max(min_capacity, math.ceil(capacity_factor * T * K / E))))


def _capacity_slots(expert_ids_TxK: jax.Array, E: int, C: int,
                    chosen_TxE: jax.Array | None = None):
  """The slot block of `capacity_experts`: slot (e, c) holds expert e's c-th token-expert
  pair (in token order). Returns token_ExC (its token; 0 when empty), filled_ExC, slot_M (each
  pair's slot e * C + c, pairs flattened [T*K]; c clipped to C - 1) and counts_E.
  chosen_TxE (`Routing.chosen`, the one-hot of the ids summed over K): given, the counts
  start from it instead of from the ids (on decoding's serial path: the routing's ranks
  lead to it directly, where the ids are one reduction further).

  A pair's rank within its expert is the number of earlier tokens that chose the expert
  (a token's K experts are distinct, as top-k ids are): a running count over the tokens'
  0/1 choices [T, E], not a sort by expert (on the H200 the sort was ~13 us of each MoHGE-3B
  layer's decode step) nor a running count over the [T*K, E] pairs (K times the rows, and
  a reduce_window's work grows with the square of its length: ~5 us a layer)."""
  T, K = expert_ids_TxK.shape
  if chosen_TxE is None:
    chosen_TxE = jnp.any(
        expert_ids_TxK[:, :, None] == jnp.arange(E, dtype=expert_ids_TxK.dtype), axis=1)
  elif chosen_TxE.shape != (T, E):
    raise ValueError(f"_capacity_slots: chosen {chosen_TxE.shape} is not [T, E] = {(T, E)}")
  hit_TxE = chosen_TxE.astype(jnp.int32)
  before_TxE = jnp.cumsum(hit_TxE, axis=0) - hit_TxE
  rank_M = jnp.take_along_axis(before_TxE, expert_ids_TxK, axis=1).reshape(T * K)
  counts_E = jnp.sum(hit_TxE, axis=0)
  ids_M = expert_ids_TxK.reshape(T * K)
  slot_M = ids_M * C + jnp.minimum(rank_M, C - 1)
  token_ExC = jnp.zeros((E * C,), jnp.int32).at[jnp.where(rank_M < C, slot_M, E * C)].set(
      jnp.arange(T * K, dtype=jnp.int32) // K, mode="drop").reshape(E, C)
  filled_ExC = jnp.arange(C) < counts_E[:, None]
  return token_ExC, filled_ExC, slot_M, counts_E


def slot_capacity(T: int, K: int, E: int, stacked: StackedExperts | None = None,
                  capacity_factor: float = 2.0, min_capacity: int = 8,
                  dropless: bool = False) -> int:
  """The rows per expert of `capacity_experts`' slot block: `expert_capacity`, rounded up
  to the kernels' row tile when `stacked`; dropless (with `stacked`): T rounded up to the
  row tile, so that no expert can overflow (`StackedExperts.dropless`)."""
  C = T if dropless else expert_capacity(T, K, E, capacity_factor, min_capacity)
  if dropless and stacked is None:
    raise ValueError("slot_capacity: dropless goes with stacked (the slot kernels' passes)")
  return C if stacked is None else -(-C // stacked.tile_rows) * stacked.tile_rows


def _slot_tokens(slot_M: jax.Array, K: int, E: int, C: int):
  """token_ExC and filled_ExC of `_capacity_slots` from the pairs' slots (distinct when no
  expert has more than C pairs)."""
  token = jnp.full((E * C,), -1, jnp.int32).at[slot_M].set(
      jnp.arange(slot_M.shape[0], dtype=jnp.int32) // K)
  return jnp.maximum(token, 0).reshape(E, C), (token >= 0).reshape(E, C)


def capacity_experts(x_TxD, expert_ids_TxK, weights_TxK, w_gate_up, w_down, *,
                     capacity_factor: float = 2.0, min_capacity: int = 8,
                     stacked: StackedExperts | None = None,
                     slots=None,
                     chosen_TxE: jax.Array | None = None) -> jax.Array:
  """`dispatch_and_combine`'s value (float32 [T, D]) for decoding's batches: each expert's
  rows gathered into a fixed-capacity slot block [E, C, D] (C = capacity_factor x the mean
  rows per expert, at least min_capacity, at most T), then per group one matmul batched
  over its N experts: each expert's weights read once, in their stored layout, as in
  `all_experts`, but E*C rows computed instead of E*T (at T = 256, K = 6, E = 64: 48 rows
  per expert against 256). Dropless: if any expert gets more than C rows the step takes
  `all_experts` instead (a `lax.cond` on the counts; exact either way).

  stacked (`stack_experts`, made once outside the decode loop): the slot block goes through
  a Mosaic GPU kernel instead (`pallas_kernels.slot_gpu.slot_gmm`, or the training
  kernels `gpu.hgmm` with kernel="hgmm": the up projection with SwiGLU, then the down
  projection, each one launch for all E experts of every width), C rounded
  up to the kernels' row tile so an expert is one tile and its weights are read once.
  XLA's per-group products run 8 launches a layer each (MoHGE-3B), most with too few
  tiles to fill the GPU (the down products at ~1/3 of the bandwidth on the H200,
  benchmarks/notes_generate.md). The outputs are bf16 (the kernels' dtype), combined in
  float32.

  slots: a routing kernel's `RouteSlots` (`pallas_kernels.route_gpu.route_slots` with
  this C, `slot_capacity`; with `stacked` only): its slots and overflow instead of the
  ranks here; where it also has each slot's token and each expert's pairs (impl "triton")
  no scatter here, and where it has the slot block's rows (`slot_x`) no gather either.
  Where its slot block has C >= T rows an expert (`slot_capacity(dropless=True)`) and
  `stacked.kernel` is "slot": no expert can overflow, so no `lax.cond` either: the slot
  kernels run the row tiles that the fullest expert fills (`slot_gpu.slot_gmm(rows_used=
  slots.max_count)`: one pass of 64 rows when no expert has more than 64 pairs, as a slot
  block of C = 64 would). On the H200 the `cond` is a CUDA-graph conditional that cost
  ~20 us a MoHGE-3B layer at batch 256 (twenty-fourth session's profile).
  chosen_TxE: `Routing.chosen` where the routing has it (`_capacity_slots`)."""
  T, D = x_TxD.shape
  K = expert_ids_TxK.shape[1]
  E = sum(w.shape[0] for w in w_gate_up)
  if (slots is not None and stacked is not None and stacked.kernel == "slot"
      and slots.slot_x is not None and slots.max_count is not None
      and slots.slot_x.shape[0] >= E * T):   # dropless: the kernels' passes, no cond
    C = slots.slot_x.shape[0] // E
    if stacked.sparse and T * K < E:   # fewer pairs than experts: the chosen ones only
      active_A = (expert_ids_TxK.reshape(K) if T == 1 else   # (a token's K are distinct)
                  jnp.nonzero(slots.counts, size=T * K, fill_value=-1)[0].astype(jnp.int32))
      y_ExCxD = stacked.ffn(slots.slot_x, active=active_A)
    else:
      y_ExCxD = stacked.ffn(slots.slot_x, rows_used=slots.max_count)
    y_TxKxD = y_ExCxD.reshape(E * C, D)[slots.slots.reshape(T * K)].reshape(T, K, D)
    return combine(y_TxKxD, weights_TxK)
  C = slot_capacity(T, K, E, stacked, capacity_factor, min_capacity)
  if stacked is None and C >= T:  # no saving over every token through every expert
    return all_experts(x_TxD, expert_ids_TxK, weights_TxK, w_gate_up, w_down)
  if slots is None:
    token_ExC, filled_ExC, slot_M, counts_E = _capacity_slots(expert_ids_TxK, E, C,
                                                              chosen_TxE)
    # all(counts <= C), not max(counts) <= C: the compare inside the reduction, one kernel
    # (on the H200 the max and the compare were two 1-thread-block launches before the
    # cond, on decoding's serial path)
    fits = jnp.all(counts_E <= C)
  else:
    if stacked is None:
      raise ValueError("capacity_experts: slots= goes with stacked= (the kernel path)")
    slot_M = slots.slots.reshape(T * K)
    if slots.counts is not None:
      filled_ExC = jnp.arange(C)[None, :] < slots.counts[:, None]
      token_ExC = jnp.where(filled_ExC, slots.slot_tokens.reshape(E, C), 0)
    else:
      token_ExC, filled_ExC = _slot_tokens(slot_M, K, E, C)
    fits = jnp.logical_not(slots.overflow)

  def bounded(_):
    if slots is not None and slots.slot_x is not None:   # the kernel's slot rows (unfilled:
      y_ExCxD = stacked.ffn(slots.slot_x)               # any values, their outputs unread)
      y_TxKxD = y_ExCxD.reshape(E * C, D)[slot_M].reshape(T, K, D)
      return combine(y_TxKxD, weights_TxK)
    x_ExCxD = x_TxD[token_ExC] * filled_ExC[..., None].astype(x_TxD.dtype)
    if stacked is not None:
      y_ExCxD = stacked.ffn(x_ExCxD.reshape(E * C, D))
    else:
      ys, first = [], 0
      for wgu_NxDxF2, wd_NxFxD in zip(w_gate_up, w_down):
        N = wgu_NxDxF2.shape[0]
        h_NxCxF2 = jnp.einsum("ncd,ndf->ncf", x_ExCxD[first:first + N], wgu_NxDxF2)
        a_NxCxF = swiglu(h_NxCxF2.astype(jnp.float32)).astype(x_TxD.dtype)
        ys.append(jnp.einsum("ncf,nfd->ncd", a_NxCxF, wd_NxFxD,
                             preferred_element_type=jnp.float32))
        first += N
      y_ExCxD = jnp.concatenate(ys)
    y_TxKxD = y_ExCxD.reshape(E * C, D)[slot_M].reshape(T, K, D)
    return combine(y_TxKxD, weights_TxK)

  return jax.lax.cond(fits, bounded,
                      lambda _: all_experts(x_TxD, expert_ids_TxK, weights_TxK, w_gate_up,
                                            w_down), None)


@jax.tree_util.register_pytree_node_class
class StackedExperts:
  """A routed layer's expert weights stacked for the Mosaic GPU kernels
  (`pallas_kernels.gpu.stack_weights`: w_gate_up side by side [D, sum 2W], w_down one
  below the other [sum W, D]; for the slot kernels then tiled, `slot_gpu.tile_weights`),
  for `capacity_experts(stacked=...)`. Stacking is a copy of
  the expert weights: made once for a whole generation (`stack_experts`), not per step
  (the kernels' training path stacks per call, which at decode cost 2.9 ms a step).
  tuning: `pallas_kernels.gpu.Config` fields as sorted (name, value) pairs (static).
  router: None, or the layer's router weights (group columns first) made once as the
  router product's operand (`routing.router_operand`), which the decode step then reads
  as they are (`experts.RoutedFFN`)."""

  def __init__(self, gate_up, down, gate_up_layout, down_layout, tuning=(), router=None):
    self.gate_up, self.down, self.router = gate_up, down, router
    self.gate_up_layout, self.down_layout = gate_up_layout, down_layout
    self.tuning = tuple(tuning)

  def tree_flatten(self):
    return ((self.gate_up, self.down, self.router),
            (self.gate_up_layout, self.down_layout, self.tuning))

  @classmethod
  def tree_unflatten(cls, aux, children):
    gate_up, down, router = children
    return cls(gate_up, down, *aux, router=router)

  def config(self):
    return kernel_config(dict(self.tuning))

  @property
  def kernel(self) -> str:
    """'slot' (`pallas_kernels.slot_gpu`: one copy ring per SM across its work items,
    tiled weights) or 'hgmm' (the training kernels, a pipeline per work item; the ninth
    session's path, kept for comparison)."""
    return dict(self.tuning).get("kernel", "slot")

  @property
  def route(self) -> str:
    """'kernel_triton' (DECODE_KERNEL_TUNING's: `pallas_kernels.route_gpu.route_slots(impl=
    "triton")`, two Triton launches of a few tokens a thread block, where its shapes fit,
    else XLA's; -0.12 ms a MoHGE-3B step at batch 256, twenty-third session), 'xla' (the
    routing functions and `_capacity_slots`; a tuning without a route), 'kernel' (the
    layer's routing and slot assignment in one Mosaic GPU launch, where its shapes fit; on
    the H200 slower than XLA's, 30 us a MoHGE-3B layer at batch 256,
    benchmarks/notes_generate.md, eleventh session) or 'kernel_rows' (the same kernel with
    a thread a token, impl="rows"; as slow, fifteenth session)."""
    return dict(self.tuning).get("route", "xla")

  @property
  def dropless(self) -> bool:
    """overflow="passes" (DECODE_KERNEL_TUNING's) with the slot kernels: where the route
    is the Triton kernel's (it writes the slot block's rows) the slot block has C >= T
    rows an expert, so no expert overflows and no `lax.cond` guards the kernels, which
    run the row tiles the fullest expert fills (`capacity_experts`). overflow="cond", or
    another route: C from capacity_factor and a `lax.cond` to `all_experts` when an
    expert overflows (the twenty-third session's path)."""
    return self.kernel == "slot" and dict(self.tuning).get("overflow", "cond") == "passes"

  @property
  def sparse(self) -> bool:
    """sparse=1 (DECODE_KERNEL_TUNING's) with the dropless slot block: a step with fewer
    token-expert pairs than experts (MoHGE-3B below 11 tokens) runs the chosen experts only
    (`slot_gpu.slot_gmm_active`), where the slot kernels and `all_experts` read every
    expert's weights (at batch 1, 64 experts where 6 are hit). MoHGE-3B on the H200
    (twenty-fifth session, one process): batch 1 1.274 ms a step against 2.440 without
    and 3.347 with all_experts; batch 8 1.782 against 2.222 and 2.052; batch 32 (no
    fewer pairs than experts) 2.392, 2.400, 2.394."""
    return self.dropless and dict(self.tuning).get("sparse", 0) == 1

  @property
  def tile_rows(self) -> int:
    return self.config().bm

  def ffn(self, x_MxD: jax.Array, rows_used: jax.Array | None = None,
          active: jax.Array | None = None) -> jax.Array:
    """SwiGLU experts over `x` [E * C, D] in slot layout (C rows an expert, a multiple of
    tile_rows): [E * C, D] in x's dtype. rows_used (int32 [1], kernel "slot"): only each
    expert's first rows_used rows are wanted (`slot_gpu.slot_gmm`'s passes; the other
    rows' outputs are not computed, or left unread). active (int32 [A], kernel "slot"):
    only these experts' first row tile (`slot_gpu.slot_gmm_active`; -1: none)."""
    from pallas_kernels import gpu, slot_gpu
    E = self.gate_up_layout.n * len(self.gate_up_layout.shapes)
    C = x_MxD.shape[0] // E
    cfg = self.config()
    if self.kernel == "slot" and active is not None:
      W = max(q for _, q in self.gate_up_layout.shapes) // 2
      h_MxW = slot_gpu.slot_gmm_active(x_MxD, (self.gate_up, self.gate_up_layout), active,
                                       rows_per_expert=C, swiglu=True, out_cols=W, cfg=cfg)
      return slot_gpu.slot_gmm_active(h_MxW, (self.down, self.down_layout), active,
                                      rows_per_expert=C, swiglu=False,
                                      out_cols=x_MxD.shape[1], cfg=cfg)
    if active is not None:
      raise ValueError("StackedExperts.ffn: active= needs kernel='slot'")
    if self.kernel == "slot":
      W = max(q for _, q in self.gate_up_layout.shapes) // 2
      pdl = bool(dict(self.tuning).get("pdl", 0))
      h_MxW = slot_gpu.slot_gmm(x_MxD, (self.gate_up, self.gate_up_layout),
                                rows_per_expert=C, swiglu=True, out_cols=W, cfg=cfg, pdl=pdl,
                                rows_used=rows_used)
      return slot_gpu.slot_gmm(h_MxW, (self.down, self.down_layout), rows_per_expert=C,
                               swiglu=False, out_cols=x_MxD.shape[1], cfg=cfg, pdl=pdl,
                               rows_used=rows_used)
    sizes_E = (C,) * E  # static: the kernels' work table is a constant
    h_MxW = gpu.hgmm(x_MxD, (self.gate_up, self.gate_up_layout), sizes_E,
                     epilogue="swiglu", cfg=cfg)[0]
    return gpu.hgmm(h_MxW, (self.down, self.down_layout), sizes_E, cfg=cfg)[0]


# The decode kernels' tiles: one expert's slot block is one 64-row tile (wgmma's smallest
# M; capacity_experts rounds C up to it), 128-deep K steps (MoHGE-3B's 14 routed layers at
# batch 256 on the H200: 2.79 ms against 3.00 with 64, benchmarks/notes_generate.md), the
# rest as the training kernels'. The routing and slot assignment by the Triton route
# kernel (`route_gpu.route_slots(impl="triton")`; XLA's where its shapes do not fit):
# MoHGE-3B at batch 256 3.70-3.73 ms a step against 3.83-3.87 with XLA's routing
# (twenty-third session, each its own process; benchmarks/notes_generate.md), 3.64 with
# its 4-token tile (twenty-fourth). The slot block dropless (overflow "passes": C >= T, no
# cond; `StackedExperts.dropless`): 3.38-3.40 ms against 3.66-3.68 with the cond
# (twenty-fourth session, same call).
DECODE_KERNEL_TUNING = {"bm": 64, "bk": 128, "route": "kernel_triton", "overflow": "passes",
                       "sparse": 1}
_NOT_CONFIG = ("kernel", "route", "pdl", "overflow", "sparse")   # StackedExperts' own keys
ROUTES = ("xla", "kernel", "kernel_rows", "kernel_triton")   # StackedExperts.route
OVERFLOWS = ("passes", "cond")   # StackedExperts.dropless


def kernel_config(tuning: dict | None = None):
  """`pallas_kernels.gpu.Config` of a decode tuning's kernel fields (DECODE_KERNEL_TUNING
  when None; StackedExperts' own keys left out)."""
  from pallas_kernels import gpu
  tuning = DECODE_KERNEL_TUNING if tuning is None else tuning
  return gpu.Config(**{k: v for k, v in tuning.items() if k not in _NOT_CONFIG})


def stack_experts(w_gate_up, w_down, router=None, **tuning) -> StackedExperts:
  """`StackedExperts` of one layer's per-group weights (in the compute dtype, bf16), and
  with router (its weights [D, L], group columns first, float32 or bf16) their operand
  made once (`routing.router_operand`).
  tuning: `pallas_kernels.gpu.Config` fields over DECODE_KERNEL_TUNING (interpret=True
  runs the kernels in the Pallas interpreter, for tests on CPU), kernel="slot" (the
  default) or "hgmm" (`StackedExperts.kernel`), route="kernel_triton" (the default),
  "xla", "kernel" or "kernel_rows" (`StackedExperts.route`), overflow="passes" (the
  default) or "cond" (`StackedExperts.dropless`), sparse=1 (the default;
  `StackedExperts.sparse`: the chosen experts only at small batches) and pdl=1 (the slot
  kernels launched with programmatic dependent launch, `slot_gpu.slot_gmm(pdl=True)`;
  right on the H200 and no faster, off by default)."""
  from pallas_kernels import gpu
  tuning = {**DECODE_KERNEL_TUNING, **tuning}
  if tuning.get("kernel", "slot") not in ("slot", "hgmm"):
    raise ValueError(f"stack_experts: kernel={tuning['kernel']!r}: must be 'slot' or 'hgmm'")
  if tuning.get("route", "xla") not in ROUTES:
    raise ValueError(f"stack_experts: route={tuning['route']!r}: must be one of {ROUTES}")
  if tuning.get("overflow", "cond") not in OVERFLOWS:
    raise ValueError(f"stack_experts: overflow={tuning['overflow']!r}: must be one of "
                     f"{OVERFLOWS}")
  for key in ("pdl", "sparse"):   # True and False compare equal to 1 and 0
    if tuning.get(key, 0) not in (0, 1):
      raise ValueError(f"stack_experts: {key}={tuning[key]!r}: must be 0 or 1")
  cfg = kernel_config(tuning)
  reason = gpu.unsupported_reason([w.shape[1] for w in w_down], w_down[0].shape[2], cfg)
  if reason:
    raise ValueError(f"stack_experts: {reason}")
  dtypes = {jnp.dtype(w.dtype) for w in (*w_gate_up, *w_down)}
  if not dtypes <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}:
    raise ValueError(f"stack_experts: the Mosaic GPU kernels take bfloat16 or float16 "
                     f"weights; got {sorted(str(d) for d in dtypes)} (cast them first)")
  gu, gu_layout = gpu.stack_weights(list(w_gate_up))
  down, down_layout = gpu.stack_weights(list(w_down))
  if tuning.get("kernel", "slot") == "slot":  # the order slot_gmm reads them in
    from pallas_kernels import slot_gpu
    gu, _ = slot_gpu.tile_weights(gu, gu_layout, cfg, swiglu=True)
    down, _ = slot_gpu.tile_weights(down, down_layout, cfg, swiglu=False)
  return StackedExperts(gu, down, gu_layout, down_layout, tuple(sorted(tuning.items())),
                        router=None if router is None else routing.router_operand(router))
