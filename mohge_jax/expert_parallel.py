"""Expert parallelism: the routed experts under `jax.shard_map` over the mesh's expert axis.

Routing and the auxiliary losses run outside (GSPMD sees global statistics); this module
takes each device's tokens with their chosen experts and weights and returns the weighted
sum of their experts' outputs. Each group's N experts are split evenly over the expert
axis, so device r holds experts [r*N/EP, (r+1)*N/EP) of every group: the All-size
Group-decoupling Allocation (spec §4; `allocation.place(..., "all_size")` is the same
layout). Local experts are ordered group-major, as `dispatch.grouped_ffn` expects.

Two exchanges, both dropless:
- `all_to_all`: send each token-expert pair to the device owning its expert
  (ragged all-to-all), compute, send the results back. Traffic ~ 2*T*K*d.
- `all_gather`: gather the expert group's tokens, compute the pairs of local experts,
  reduce-scatter the partial outputs. Traffic ~ 2*EP*T*d: cheaper when EP < K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mohge_jax import collectives
from mohge_jax.dispatch import (combine, count_ids, grouped_ffn, inverse_permutation,
                               permute_rows)
from mohge_jax.sharding import BATCH_AXES

AXIS = "expert"


def _owner_and_local(expert_ids, *, experts_per_group: int, ep: int,
                     num_groups: int = 0, placement: str = "all_size"):
  """Logical expert id -> (owning rank on the expert axis, local id group-major).

  all_size: rank r owns experts [r*N/EP, (r+1)*N/EP) of every group; local ids are dense.
  naive: rank r owns whole groups [r*G/EP, (r+1)*G/EP) (needs num_groups); local ids are
  the global ids (every rank holds every group's weights and runs only its own: see
  `_local_ffn`).
  """
  N = experts_per_group
  group, n = expert_ids // N, expert_ids % N
  if placement == "naive":
    return group // (num_groups // ep), expert_ids
  n_local = N // ep
  return n // n_local, group * n_local + n % n_local


def _num_local(num_groups: int, experts_per_group: int, ep: int, placement: str) -> int:
  """Local expert ids per rank: its N/EP experts of each group (all_size), or all G*N
  (naive: the rows of other ranks' groups are none, so their experts get zero rows)."""
  return num_groups * experts_per_group // (ep if placement == "all_size" else 1)


def _vary_like(w, x):
  """w marked as varying over the mesh axes x varies over (and w does not)."""
  return collectives.vary_as(w, collectives.varying_axes(w) | collectives.varying_axes(x))


def _local_ffn(x, sizes, w_gate_up, w_down, *, backend):
  """The grouped experts over rows sorted by local expert id. all_size: the weights given
  are this rank's shards. naive: every group's weights are given and `sizes` is zero for
  the experts of other ranks' groups, so only this rank's groups compute (no control flow
  on the rank: an earlier `lax.switch` on the rank hung on two GPUs).

  The weights are first marked as varying over every mesh axis the tokens vary over (the
  batch axes): their gradients are per device until pcast's transpose sums them there. A
  custom VJP (the Pallas kernels', per_expert's) must return gradients typed like its
  inputs, which it cannot do for weights that are invariant over axes their gradients
  vary over."""
  w_gate_up = [_vary_like(w, x) for w in w_gate_up]
  w_down = [_vary_like(w, x) for w in w_down]
  # The buffer is dropless (at EP 2 about half of it padding), so the Pallas kernels are
  # told not to zero the padding rows; the two selects zero them instead: the output's, and
  # through the first select's transpose the rows of x's gradient.
  valid_Mx1 = (jnp.arange(x.shape[0]) < jnp.sum(sizes))[:, None]
  x = jnp.where(valid_Mx1, x, jnp.zeros((), x.dtype))
  y = grouped_ffn(x, sizes, w_gate_up, w_down, backend=backend, zero_padding=False)
  return jnp.where(valid_Mx1, y, jnp.zeros((), y.dtype))


# Rows are permuted by dispatch.permute_rows, whose backward pass is a gather: the plain
# gathers' scatter-adds took 328 ms of a 2.6 s MoHGE-3B EP 2 step on the H200s (all_gather
# exchange). Like every custom VJP under shard_map here (the Pallas kernels' too), it gives
# wrong gradients in jax 0.11.2 when the pullback of a jitted forward pass is jitted
# separately (`jax.jit(pullback)` after `jax.vjp(jax.jit(f), ...)`: seen on CPU; the
# residuals come back wrong). Forward and backward in one jit, as the training step and
# jax.jit(jax.grad(f)) do, are exact: tests/test_collectives.py::check_expert_parallel.


def _counts_by_rank(ids_TxK, num_groups, experts_per_group, ep, E_l, placement):
  """Pairs per (owning rank, local expert): int32 [ep, E_l]. Counted over the G*N experts
  (as one device counts them) and placed by a static map, not over the ep*E_l
  (rank, local) keys: for naive at EP 2 on MoHGE-3B those are 128 bins, whose one-hot
  count never finished compiling on the H200s (dispatch.ONE_HOT_MAX_BINS)."""
  E = num_groups * experts_per_group
  owner_E, local_E = _owner_and_local(np.arange(E), experts_per_group=experts_per_group,
                                      ep=ep, num_groups=num_groups, placement=placement)
  counts_E = count_ids(ids_TxK, E)
  return jnp.zeros((ep, E_l), jnp.int32).at[owner_E, local_E].set(counts_E)


def _a2a_local(x_TxD, ids_TxK, w_TxK, w_gate_up, w_down, *, experts_per_group, ep, backend,
               placement, a2a_impl="auto"):
  T, K = ids_TxK.shape
  M = T * K
  E_l = _num_local(len(w_gate_up), experts_per_group, ep, placement)
  owner_M, local_M = _owner_and_local(ids_TxK.reshape(M), experts_per_group=experts_per_group,
                                      ep=ep, num_groups=len(w_gate_up), placement=placement)
  key_M = owner_M * E_l + local_M  # by destination rank, then local expert
  order_M = jnp.argsort(key_M, stable=True)
  inverse_M = inverse_permutation(order_M)
  x_send_MxD = permute_rows(jnp.repeat(x_TxD, K, axis=0), order_M, inverse_M)
  counts_RxEl = _counts_by_rank(ids_TxK, len(w_gate_up), experts_per_group, ep, E_l, placement)
  send_R = counts_RxEl.sum(1)
  send_off_R = jnp.cumsum(send_R) - send_R
  recv_R, out_off_R = collectives.exchange_sizes(send_R, axis_name=AXIS)
  recv_counts_RxEl = jax.lax.all_to_all(counts_RxEl, AXIS, 0, 0, tiled=True)

  # Received rows: by source rank, each source's rows sorted by local expert.
  cap = ep * M  # dropless: one device may receive every pair of its expert group
  x_recv = collectives.ragged_all_to_all(
      x_send_MxD, jnp.zeros((cap, x_TxD.shape[1]), x_TxD.dtype), send_off_R, send_R,
      out_off_R, recv_R, axis_name=AXIS, impl=a2a_impl)
  local_ids = jnp.tile(jnp.arange(E_l, dtype=jnp.int32), ep)
  local_row = jnp.repeat(local_ids, recv_counts_RxEl.reshape(-1), total_repeat_length=cap)
  local_row = jnp.where(jnp.arange(cap) < recv_R.sum(), local_row, E_l)  # padding last
  order_C = jnp.argsort(local_row, stable=True)
  inverse_C = inverse_permutation(order_C)
  y_sorted = _local_ffn(permute_rows(x_recv, order_C, inverse_C), recv_counts_RxEl.sum(0),
                        w_gate_up, w_down, backend=backend)
  y_recv = permute_rows(y_sorted, inverse_C, order_C)

  # Return trip: each source's rows back to where it sent them from.
  recv_off_R = jnp.cumsum(recv_R) - recv_R  # sources' rows in this buffer, in rank order
  back_out_off_R = jax.lax.all_to_all(send_off_R, AXIS, 0, 0, tiled=True)
  y_back_MxD = collectives.ragged_all_to_all(
      y_recv, jnp.zeros((M, x_TxD.shape[1]), y_recv.dtype), recv_off_R, recv_R,
      back_out_off_R, send_R, axis_name=AXIS, impl=a2a_impl)
  y_TxKxD = permute_rows(y_back_MxD, inverse_M, order_M).reshape(T, K, -1)
  return combine(y_TxKxD, w_TxK)


def _all_gather_local(x_TxD, ids_TxK, w_TxK, w_gate_up, w_down, *, experts_per_group, ep,
                      backend, placement, a2a_impl=None):
  del a2a_impl  # no ragged exchange here
  x_all = jax.lax.all_gather(x_TxD, AXIS, tiled=True)  # the expert group's tokens
  ids_all = jax.lax.all_gather(ids_TxK, AXIS, tiled=True)
  w_all = jax.lax.all_gather(w_TxK, AXIS, tiled=True)
  T, K = ids_all.shape
  E_l = _num_local(len(w_gate_up), experts_per_group, ep, placement)
  owner_M, local_M = _owner_and_local(ids_all.reshape(T * K),
                                      experts_per_group=experts_per_group, ep=ep,
                                      num_groups=len(w_gate_up), placement=placement)
  local_M = jnp.where(owner_M == jax.lax.axis_index(AXIS), local_M, E_l)  # others' last
  order_M = jnp.argsort(local_M, stable=True)
  inverse_M = inverse_permutation(order_M)
  sizes_El = count_ids(local_M, E_l)  # others' pairs (E_l) are not counted
  x_sorted = permute_rows(jnp.repeat(x_all, K, axis=0), order_M, inverse_M)
  y_sorted = _local_ffn(x_sorted, sizes_El, w_gate_up, w_down, backend=backend)
  y_TxKxD = permute_rows(y_sorted, inverse_M, order_M).reshape(T, K, -1)
  # The partial sums travel in the activations' dtype (bf16 in training: half of float32's
  # bytes, ~50 ms of a 2.3 s MoHGE-3B EP 2 step on two H200s). Each partial is rounded
  # to bf16 once and the reduction rounds each of its EP-1 additions: at EP 2 ~1.5 bf16
  # ulps, where the cast to bf16 for the residual add that follows anyway (experts.py)
  # rounds by half an ulp.
  partial_TxD = combine(y_TxKxD, w_all).astype(x_TxD.dtype)
  out_TxD = jax.lax.psum_scatter(partial_TxD, AXIS, scatter_dimension=0, tiled=True)
  return out_TxD.astype(jnp.float32)


def resolve_comm(comm: str, ep: int, top_k: int) -> str:
  """mesh.expert_comm="auto": all_gather while ep < top_k, else all_to_all. Per rank and
  layer, all_gather moves (ep-1)*T token rows in and as many partial outputs out; the
  ragged all-to-all moves the ~top_k*T*(ep-1)/ep token-expert pairs bound elsewhere, out and
  back. At ep 2 on two H200s all_gather's step was 0.78x all_to_all's (MoHGE-3B)."""
  if comm == "auto":
    return "all_gather" if ep < top_k else "all_to_all"
  return comm


def routed_experts(x_TxD: jax.Array, expert_ids_TxK: jax.Array, weights_TxK: jax.Array,
                   w_gate_up, w_down, *, mesh, experts_per_group: int, comm: str,
                   backend: str, placement: str = "all_size",
                   a2a_impl: str = "auto") -> jax.Array:
  """Sum_k weights[t,k] * expert_{ids[t,k]}(x[t]) with experts split over `mesh`'s expert
  axis. Returns float32 [T, D] sharded like x.

  placement="naive" (whole groups per rank, the paper's contrast) gathers every group's
  weights on every expert rank (inside the shard_map, so their gradients reduce-scatter
  back) and runs only the owned groups: its compute and token traffic are naive's, its
  weight memory and weight traffic are not.
  """
  ep = mesh.shape[AXIS]
  G = len(w_gate_up)
  comm = resolve_comm(comm, ep, expert_ids_TxK.shape[1])
  if experts_per_group % ep:  # the weights are split over the axis in both placements
    raise ValueError(f"expert axis of size {ep} must divide experts_per_group={experts_per_group}")
  if placement == "naive" and G % ep:
    raise ValueError(f"naive placement: expert axis of size {ep} must divide the {G} groups")
  local = {"all_to_all": _a2a_local, "all_gather": _all_gather_local}[comm]
  batch = P(BATCH_AXES, None)
  expert_w = P(AXIS, None, None)

  def body(x, ids, w, wgu, wd):
    if placement == "naive":  # every group's weights here; the gradients reduce-scatter
      # (replicated in_specs had XLA all-gather them at the boundary and all-reduce their
      # gradients: twice a reduce-scatter's bytes)
      wgu, wd = ([jax.lax.all_gather(a, AXIS, axis=0, tiled=True) for a in t]
                 for t in (wgu, wd))
    return local(x, ids, w, list(wgu), list(wd), experts_per_group=experts_per_group, ep=ep,
                 backend=backend, placement=placement, a2a_impl=a2a_impl)

  return jax.shard_map(
      body, mesh=mesh, in_specs=(batch, batch, batch, (expert_w,) * len(w_gate_up),
                                 (expert_w,) * len(w_down)),
      out_specs=batch)(x_TxD, expert_ids_TxK, weights_TxK, tuple(w_gate_up), tuple(w_down))
