"""Collectives for dropless expert-parallel dispatch, usable on fake CPU devices.

`jax.lax.ragged_all_to_all` moves variable-size row slices between devices, which is what
dropless expert parallelism needs, but XLA:CPU cannot compile it. `ragged_all_to_all` here
has the same signature and semantics and falls back on CPU to an emulation made of dense
`jax.lax.all_to_all`s, so multi-device tests (`--xla_force_host_platform_device_count`) run
the same code as GPU/TPU. `exchange_sizes` computes the receive sizes and sender-side output
offsets that a contiguous, source-ordered exchange needs. On GPUs the real op runs with two
workarounds, each found on two H200s and explained where it is: a data-dependent output
buffer (`_lax_exchange`) and an explicit backward pass (`with_reverse_vjp`).
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import jax
import jax.numpy as jnp

AxisName = str | tuple[str, ...]
IMPLS = ("auto", "lax", "lax_autodiff", "emulated")


def _a2a(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """Tiled all_to_all on the leading axis: block j goes to rank j, received blocks in
  source-rank order."""
  return jax.lax.all_to_all(x, axis_name, 0, 0, tiled=True)


def exchange_sizes(send_sizes_R: jax.Array, *, axis_name: AxisName
                   ) -> tuple[jax.Array, jax.Array]:
  """(recv_sizes_R, output_offsets_R) for sending `send_sizes_R[j]` rows to rank j.

  Received rows are packed at the start of each receiver's buffer in source-rank order, so
  the offset of my rows in rank j's buffer is what ranks before me send to j. Two small
  all_to_alls: each receiver learns its `recv_sizes`, takes their exclusive cumsum (where
  each source's rows start in its buffer) and sends those starts back to the sources. The
  results are exactly the `recv_sizes` / `output_offsets` arguments of `ragged_all_to_all`.
  A length K = R * S (S slices per rank, slice i going to rank i // S) also works: slices
  are then packed in (source rank, slice) order.
  """
  recv_sizes_R = _a2a(send_sizes_R, axis_name)
  starts_R = jnp.cumsum(recv_sizes_R) - recv_sizes_R
  return recv_sizes_R, _a2a(starts_R.astype(send_sizes_R.dtype), axis_name)


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, axis_name):
  """Dense emulation: pad every slice to C = operand rows, all_to_all, place the rows.

  Sends a [K, C, ...] buffer (K = len(send_sizes), at least R×C rows per device for an axis
  of size R), so it costs memory and bandwidth quadratic in the rows: for tests on CPU, not
  production. Only gathers, selects and all_to_alls, so results are bitwise exact and
  autodiff gives the transpose (cotangent rows gathered back to the sent rows).
  """
  C, M, K = operand.shape[0], output.shape[0], send_sizes.shape[0]
  c_C = jnp.arange(C)
  # Sender: slice i padded to C rows; rows past send_sizes[i] are zero (and get no gradient).
  src_KxC = input_offsets[:, None] + c_C
  sent_KxC = c_C < send_sizes[:, None]
  rows = jnp.take(operand, jnp.clip(src_KxC, 0, C - 1).reshape(-1), axis=0)
  rows = rows.reshape(K, C, *operand.shape[1:])
  mask = sent_KxC.reshape(K, C, *(1,) * (operand.ndim - 1))
  recv = _a2a(jnp.where(mask, rows, jnp.zeros((), operand.dtype)), axis_name)
  # Receiver: row c of received slice i lands at output_offsets_[i] + c if c < recv_sizes[i].
  dst_KxC = _a2a(output_offsets, axis_name)[:, None] + c_C
  dst_KxC = jnp.where(c_C < recv_sizes[:, None], dst_KxC, M)  # M: out of range, dropped
  # Which received row (if any) each output row takes; an integer scatter, so the data path
  # is a gather + select whose gradient is cheap and exact.
  src_M = jnp.full((M,), K * C, jnp.int32).at[dst_KxC.reshape(-1)].set(
      jnp.arange(K * C, dtype=jnp.int32), mode="drop")
  taken = jnp.take(recv.reshape(K * C, *output.shape[1:]), jnp.minimum(src_M, K * C - 1),
                   axis=0)
  written_M = (src_M < K * C).reshape(M, *(1,) * (output.ndim - 1))
  return jnp.where(written_M, taken.astype(output.dtype), output)


def written_rows(offsets_K: jax.Array, sizes_K: jax.Array, rows: int) -> jax.Array:
  """[rows] bool: row m lies in some slice [offsets_K[k], offsets_K[k] + sizes_K[k]).

  Slices must not overlap. +1 at every start and -1 at every end of a non-empty slice,
  scatter-ADDED, then a running sum (empty slices add nothing: with a set, an empty slice
  where another starts would leave its -1 to cancel that start)."""
  marks = jnp.zeros((rows + 1,), jnp.int32)
  marks = marks.at[offsets_K].add(jnp.where(sizes_K > 0, 1, 0), mode="drop")
  marks = marks.at[offsets_K + sizes_K].add(jnp.where(sizes_K > 0, -1, 0), mode="drop")
  return jnp.cumsum(marks)[:rows] > 0


def varying_axes(x: jax.Array) -> frozenset:
  """The mesh axes x varies over inside `jax.shard_map` (empty outside)."""
  return frozenset(jax.typeof(x).mat.varying)


def vary_as(x: jax.Array, axes: frozenset) -> jax.Array:
  """x typed as varying over exactly `axes`: pcast to varying over the missing ones; summed
  over the extra ones (a cotangent for a value that was the same on every device of those
  axes: the transpose of its implicit broadcast)."""
  have = varying_axes(x)
  extra, missing = tuple(sorted(have - axes)), tuple(sorted(axes - have))
  if extra:
    x = jax.lax.psum(x, extra)
  if missing:
    x = jax.lax.pcast(x, missing, to="varying")
  return x


def _lax_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                  axis_name):
  """jax.lax.ragged_all_to_all, its output buffer made data-dependent first.

  Why: on 2 x H200 (jax 0.11.2) the expert-parallel layer's gradients were wrong (relative
  error ~1) while its forward values, and a lone exchange and its transpose, were exact.
  The same wrong numbers came with jax's transpose rule and with the reverse exchange
  below, and with each XLA flag for the op tried (ragged_all_to_all_use_barrier_with_nccl,
  _use_device_kernel=false, _enable_ragged_all_to_all_decomposer). With each output buffer
  computed from the data (+ 0 x a finite element of the operand) instead of a broadcast
  constant (`jnp.zeros`), the layer matched one device in every output and gradient, in
  float32, for both exchanges and placements (benchmarks/ep_equality.py; the GPU test in
  tests/test_collectives.py). The term is 0 for any operand (non-finite elements are
  replaced first), so values never change.
  """
  first = jnp.sum(operand.reshape(-1)[:1]).astype(output.dtype)  # 0 if operand is empty
  output = output + 0 * jnp.where(jnp.isfinite(first), first, 0)
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                   output_offsets, recv_sizes, axis_name=axis_name)


def with_reverse_vjp(exchange, operand, output, input_offsets, send_sizes, output_offsets,
                     recv_sizes, axis_name):
  """`exchange(...)` (a ragged all-to-all: the real op or the emulation) with an explicit
  backward pass, the reverse exchange through the same `exchange`.

  Every receiver sends each source's slice of the cotangent back, from where it landed
  (the sources' output offsets, exchanged) to where it came from (the sources' input
  offsets, exchanged); the output buffer's cotangent is the incoming one with the written
  rows zeroed. Used for the real op ("lax"). jax's own transpose rule gets the output
  buffer's cotangent wrong when an empty slice sits where another slice starts (its
  written-rows mask sets +1 at each start, so the two starts give one +1, and adds -1 at
  each end, the empty slice's included: seen on the H200s); `written_rows` adds both."""
  operand_shape, M_rows = operand.shape, output.shape[0]
  # Inside shard_map each cotangent must vary over the same mesh axes as its primal.
  operand_axes, output_axes = varying_axes(operand), varying_axes(output)

  @jax.custom_vjp
  def f(operand, output, *sizes):
    return exchange(operand, output, *sizes, axis_name)

  def fwd(operand, output, *sizes):
    return exchange(operand, output, *sizes, axis_name), sizes

  def bwd(sizes, ct):
    input_offsets, send_sizes, output_offsets, recv_sizes = sizes
    landed_K = _a2a(output_offsets, axis_name)  # where each source's slice is in my buffer
    came_from_K = _a2a(input_offsets, axis_name)  # where it was in the source's operand
    zeros = vary_as(jnp.zeros(operand_shape, ct.dtype), varying_axes(ct))
    d_operand = exchange(ct, zeros, landed_K, recv_sizes, came_from_K, send_sizes, axis_name)
    mask = written_rows(landed_K, recv_sizes, M_rows).reshape(
        M_rows, *(1,) * (ct.ndim - 1))
    d_output = jnp.where(mask, jnp.zeros((), ct.dtype), ct)
    return (vary_as(d_operand, operand_axes), vary_as(d_output, output_axes)) + (None,) * 4

  f.defvjp(fwd, bwd)
  return f(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)


# XLA:GPU's implementations of ragged-all-to-all, chosen by process-wide XLA flags. Measured
# on 2 x H200 (jax 0.11.2, benchmarks/ragged_a2a_probe.py: 786,432 x 1024 bf16 rows per
# rank, half to each rank): the default one-shot kernel took 296 ms, the decomposed form
# 8.1 ms, a dense all_to_all of the same rows 3.0 ms. The decomposed form pads every slice
# to the output buffer (dense all-to-all), so its traffic grows with the expert axis;
# "nccl" sends the exact rows with NCCL send/recv.
GPU_A2A_FLAGS = {
    "decomposed": ("--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true",),
    "nccl": ("--xla_gpu_unsupported_use_ragged_all_to_all_one_shot_kernel=false",
             "--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true"),
    "one_shot": (),
}


def use_gpu_a2a(kind: str) -> list[str]:
  """Adds GPU_A2A_FLAGS[kind] to XLA_FLAGS; returns the flags added.

  XLA reads XLA_FLAGS once, when the backend starts: call this first (train.py does, from
  mesh.gpu_a2a). Flags the user already set for ragged-all-to-all are kept as they are.
  Warns when a GPU backend is already running without the flags. Harmless off GPUs."""
  if kind not in GPU_A2A_FLAGS:
    raise ValueError(f"gpu_a2a must be one of {tuple(GPU_A2A_FLAGS)}, got {kind!r}")
  current = os.environ.get("XLA_FLAGS", "").split()
  if any("ragged_all_to_all" in f for f in current):
    return []  # the user's choice
  added = list(GPU_A2A_FLAGS[kind])
  if not added:
    return []
  from jax._src import xla_bridge  # no public way to ask whether the backend started
  if xla_bridge.backends_are_initialized() and jax.default_backend() == "gpu":
    warnings.warn(f"XLA_FLAGS for the {kind} ragged all-to-all come too late: the GPU "
                  f"backend is running. Start the process with XLA_FLAGS='{' '.join(added)}'",
                  stacklevel=2)
  os.environ["XLA_FLAGS"] = " ".join(current + added)
  return added


def _resolve_impl(impl: str) -> str:
  """'lax' on GPU/TPU, 'emulated' on CPU (judged from the default backend at trace time)."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "emulated" if jax.default_backend() == "cpu" else "lax"
  return impl


def ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                      send_sizes: jax.Array, output_offsets: jax.Array,
                      recv_sizes: jax.Array, *, axis_name: AxisName,
                      impl: Literal["auto", "lax", "emulated"] = "auto") -> jax.Array:
  """`jax.lax.ragged_all_to_all` with a CPU fallback; call inside `jax.shard_map`.

  Same semantics: slice i = operand[input_offsets[i]:+send_sizes[i]] goes to rank
  i // (K / R) (K = len(send_sizes), R = axis size) and is written there at
  `output_offsets[i]` (given by the SENDER, indexing the RECEIVER's buffer); the receiver
  writes `recv_sizes[i]` rows per received slice and every other row keeps `output`'s value.
  `exchange_sizes` gives consistent `recv_sizes` / `output_offsets` for packed buffers.

  impl: "lax" = `jax.lax.ragged_all_to_all` (GPU/TPU; XLA:CPU cannot compile it) with
  the explicit reverse exchange as its backward pass (`with_reverse_vjp`);
  "lax_autodiff" = the op with jax's own transpose rule (wrong for `output`'s cotangent:
  see `with_reverse_vjp`; kept to test against);
  "emulated" = dense all_to_all emulation (exact, differentiable, but R×C rows of memory per
  device for C = operand rows: for tests); "auto" = "emulated" on CPU, else "lax".
  """
  impl = _resolve_impl(impl)
  if impl == "lax":
    return with_reverse_vjp(_lax_exchange, operand, output, input_offsets, send_sizes,
                            output_offsets, recv_sizes, axis_name)
  if impl == "lax_autodiff":
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=axis_name)
  return _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name)
