"""Collectives for dropless expert-parallel dispatch, usable on fake CPU devices.

`jax.lax.ragged_all_to_all` moves variable-size row slices between devices, which is what
dropless expert parallelism needs, but XLA:CPU cannot compile it. `ragged_all_to_all` here
has the same signature and semantics and falls back on CPU to an emulation made of dense
`jax.lax.all_to_all`s, so multi-device tests (`--xla_force_host_platform_device_count`) run
the same code as GPU/TPU. `exchange_sizes` computes the receive sizes and sender-side output
offsets that a contiguous, source-ordered exchange needs.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AxisName = str | tuple[str, ...]
IMPLS = ("auto", "lax", "emulated")


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

  impl: "lax" = `jax.lax.ragged_all_to_all` (GPU/TPU; XLA:CPU cannot compile it);
  "emulated" = dense all_to_all emulation (exact, differentiable, but R×C rows of memory per
  device for C = operand rows: for tests); "auto" = "emulated" on CPU, else "lax".
  """
  if _resolve_impl(impl) == "lax":
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=axis_name)
  return _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name)
