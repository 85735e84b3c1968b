"""Pure-JAX references for the heterogeneous grouped matmuls (one per kernel).

Vocabulary shared by every kernel in this package:

- G groups of N experts each, E = G·N experts in group-major order (expert n of group g
  has global index g·N + n). Rows of the left operand are sorted by expert;
  `group_sizes_E[e]` rows belong to expert e; rows at index >= sum(group_sizes_E) are
  padding.
- Every group has its own static shapes (e.g. width W_g): the right operands come as a
  tuple of G arrays, one per group.
- Row-ragged operands whose width depends on the group are stored *padded* to the
  largest width: [M, Fmax], group g's rows using columns [0, F_g). The *split* layout
  holds a gate/up pair: [M, 2·Wmax] with group g's gate at columns [0, W_g) and its up
  projection at [Wmax, Wmax + W_g); logically that is the 2·W_g columns
  gate ‖ up. Columns a group does not use are unspecified in kernel outputs (these
  references write 0 there) and are never read by any kernel.

Each reference works per group on rows rolled to start at 0, with
`jax.lax.ragged_dot` / `ragged_dot_general` (float32 accumulation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def split_to_logical(a_MxP, width, wmax):
  """Split layout [M, 2·wmax] → group-logical [M, 2·width] (gate ‖ up)."""
  return jnp.concatenate([a_MxP[:, :width], a_MxP[:, wmax:wmax + width]], axis=1)


def logical_to_split(a_MxF, width, wmax):
  """Group-logical [M, 2·width] → split layout [M, 2·wmax] (zeros elsewhere)."""
  m = a_MxF.shape[0]
  out = jnp.zeros((m, 2 * wmax), a_MxF.dtype)
  out = out.at[:, :width].set(a_MxF[:, :width])
  return out.at[:, wmax:wmax + width].set(a_MxF[:, width:])


def group_row_ranges(group_sizes_E, num_groups):
  """Per group: (row start, expert sizes of that group) as traced values."""
  sizes_GxN = group_sizes_E.reshape(num_groups, -1).astype(jnp.int32)
  totals_G = sizes_GxN.sum(axis=1)
  starts_G = jnp.cumsum(totals_G) - totals_G
  return starts_G, sizes_GxN


def _read_lhs(lhs, k, lhs_split, wmax):
  if lhs_split:
    return split_to_logical(lhs, k // 2, wmax)
  return lhs[:, :k]


def hgmm_ref(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs=False, lhs_split=False,
             out_split=False, out_cols=None):
  """Row-ragged heterogeneous grouped matmul.

  For row r of expert n of group g: out[r, :F_g] = lhs[r, :K_g] @ rhs[g][n]
  (rhs[g] is [N, K_g, F_g], or [N, F_g, K_g] with transpose_rhs). With lhs_split /
  out_split the K / F axis is in the split layout (logical 2·W_g, physical 2·Wmax).
  Padding rows give 0. out_cols: physical width of the output (default max F_g, or
  twice that for out_split).
  """
  m = lhs_MxK.shape[0]
  ks = [w.shape[2] if transpose_rhs else w.shape[1] for w in rhs]
  fs = [w.shape[1] if transpose_rhs else w.shape[2] for w in rhs]
  kmax_half = lhs_MxK.shape[1] // 2
  if out_cols is None:
    out_cols = max(fs)
  fmax_half = out_cols // 2
  starts_G, sizes_GxN = group_row_ranges(group_sizes_E, len(rhs))
  out = jnp.zeros((m, out_cols), jnp.float32)
  for g, w in enumerate(rhs):
    if transpose_rhs:
      w = jnp.swapaxes(w, 1, 2)
    lhs_g = jnp.roll(_read_lhs(lhs_MxK, ks[g], lhs_split, kmax_half), -starts_G[g], axis=0)
    y_g = jax.lax.ragged_dot(lhs_g, w, sizes_GxN[g], preferred_element_type=jnp.float32)
    y_g = jnp.roll(y_g, starts_G[g], axis=0)  # rows outside the group are 0
    if out_split:
      y_g = logical_to_split(y_g, fs[g] // 2, fmax_half)
    else:
      y_g = jnp.pad(y_g, ((0, 0), (0, out_cols - fs[g])))
    out = out + y_g
  return out.astype(lhs_MxK.dtype)


def tgmm_ref(lhs_MxK, rhs_MxF, group_sizes_E, shapes, *, lhs_split=False, rhs_split=False):
  """Transposed (weight-gradient) grouped matmul.

  shapes: per group (N, K_g, F_g). Returns a tuple of G arrays [N, K_g, F_g] with
  out[g][n] = lhs[rows(g, n), :K_g]^T @ rhs[rows(g, n), :F_g] (split layouts read as
  in hgmm_ref). Experts without rows give 0.
  """
  starts_G, sizes_GxN = group_row_ranges(group_sizes_E, len(shapes))
  kh, fh = lhs_MxK.shape[1] // 2, rhs_MxF.shape[1] // 2
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  outs = []
  for g, (n, k, f) in enumerate(shapes):
    a = jnp.roll(_read_lhs(lhs_MxK, k, lhs_split, kh), -starts_G[g], axis=0)
    b = jnp.roll(_read_lhs(rhs_MxF, f, rhs_split, fh), -starts_G[g], axis=0)
    o = jax.lax.ragged_dot_general(a, b, sizes_GxN[g], dims,
                                   preferred_element_type=jnp.float32)
    outs.append(o.astype(lhs_MxK.dtype))
  return tuple(outs)


def swiglu_ref(gu_MxP):
  """Split-layout [gate | up] → silu(gate)·up, [M, Wmax], computed in float32."""
  wmax = gu_MxP.shape[1] // 2
  g = gu_MxP[:, :wmax].astype(jnp.float32)
  u = gu_MxP[:, wmax:].astype(jnp.float32)
  return (jax.nn.silu(g) * u).astype(gu_MxP.dtype)


def swiglu_bwd_ref(gu_MxP, dh_MxW):
  """Gradient of swiglu_ref: returns d[gate | up] in the split layout."""
  wmax = gu_MxP.shape[1] // 2
  g = gu_MxP[:, :wmax].astype(jnp.float32)
  u = gu_MxP[:, wmax:].astype(jnp.float32)
  dh = dh_MxW.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  silu = g * sig
  dg = dh * u * sig * (1.0 + g * (1.0 - sig))
  du = dh * silu
  return jnp.concatenate([dg, du], axis=1).astype(gu_MxP.dtype)


def expert_ffn_ref(x_MxD, group_sizes_E, w_gate_up, w_down):
  """The expert layer by plain autodiff-able JAX, one ragged_dot per group and matmul.

  y[row] = (silu(x@Wg) * (x@Wu)) @ Wd for the row's expert; padding rows give 0.
  Compute in the input dtype with float32 accumulation (the intermediate h is rounded
  to the input dtype, as in the kernels).
  """
  starts_G, sizes_GxN = group_row_ranges(group_sizes_E, len(w_gate_up))
  y = jnp.zeros(x_MxD.shape, jnp.float32)
  for g, (wgu, wd) in enumerate(zip(w_gate_up, w_down)):
    width = wd.shape[1]
    xg = jnp.roll(x_MxD, -starts_G[g], axis=0)
    gu = jax.lax.ragged_dot(xg, wgu, sizes_GxN[g], preferred_element_type=jnp.float32)
    gu = gu.astype(x_MxD.dtype).astype(jnp.float32)
    h = (jax.nn.silu(gu[:, :width]) * gu[:, width:]).astype(x_MxD.dtype)
    yg = jax.lax.ragged_dot(h, wd, sizes_GxN[g], preferred_element_type=jnp.float32)
    y = y + jnp.roll(yg, starts_G[g], axis=0)
  return y.astype(x_MxD.dtype)
