"""The expert layer as a custom_vjp over grouped-matmul building blocks.

Forward:   gu = x @ Wgu (split layout)   h = silu(gate)·up   y = h @ Wd
Backward:  dh = dy @ Wdᵀ   dgu = swiglu'(gu, dh)   dx = dgu @ Wguᵀ
           dWd = hᵀ dy     dWgu = xᵀ dgu          (per expert, over its rows)

A backend ("ops") supplies hgmm / tgmm (see reference.py for their meaning) and may
supply fused `up` (matmul + SwiGLU epilogue) and `down_bwd` (matmul + SwiGLU-gradient
epilogue); otherwise these are composed from hgmm and the elementwise references.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference


class Ops:
  """Reference building blocks; backends override what they implement."""

  name = "reference"

  def __init__(self, **tuning):
    self.tuning = tuning

  def _key(self):
    return (type(self), tuple(sorted(self.tuning.items())))

  def __eq__(self, other):
    return isinstance(other, Ops) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def hgmm(self, lhs, rhs, group_sizes, **kw):
    return reference.hgmm_ref(lhs, rhs, group_sizes, **kw)

  def tgmm(self, lhs, rhs, group_sizes, shapes, **kw):
    return reference.tgmm_ref(lhs, rhs, group_sizes, shapes, **kw)

  def up(self, x_MxD, w_gate_up, group_sizes, *, save_gu):
    """→ (h [M, Wmax], gu [M, 2·Wmax] split layout, or None unless save_gu)."""
    wmax = max(w.shape[2] // 2 for w in w_gate_up)
    gu = self.hgmm(x_MxD, w_gate_up, group_sizes, out_split=True, out_cols=2 * wmax)
    return reference.swiglu_ref(gu), (gu if save_gu else None)

  def down(self, h_MxW, w_down, group_sizes):
    return self.hgmm(h_MxW, w_down, group_sizes)

  def down_bwd(self, dy_MxD, w_down, group_sizes, gu):
    """→ dgu [M, 2·Wmax] (split layout): SwiGLU gradient of dh = dy @ Wdᵀ."""
    dh = self.hgmm(dy_MxD, w_down, group_sizes, transpose_rhs=True,
                   out_cols=gu.shape[1] // 2)
    return reference.swiglu_bwd_ref(gu, dh)


def _typed_like(a, like):
  """`a` typed as varying over exactly the mesh axes `like` varies over (inside
  `jax.shard_map`; a no-op outside). A pallas_call's outputs vary over no axis, though
  each device computed its own: the layer's output must vary like its rows (typed
  invariant, autodiff would psum its cotangent over the devices: the weight gradients of
  expert parallelism through the kernels were 2x-summed garbage on two H200s), and each
  cotangent like its primal, as a custom VJP must return it. Axes `like` does not vary over
  are summed (a cotangent of a value that was the same on all of them)."""
  have, want = (frozenset(jax.typeof(v).mat.varying) for v in (a, like))
  if extra := tuple(sorted(have - want)):
    a = jax.lax.psum(a, extra)
  if missing := tuple(sorted(want - have)):
    a = jax.lax.pcast(a, missing, to="varying")
  return a


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ffn(x_MxD, group_sizes_E, w_gate_up, w_down, ops):
  h, _ = ops.up(x_MxD, w_gate_up, group_sizes_E, save_gu=False)
  return _typed_like(ops.down(h, w_down, group_sizes_E), x_MxD)


def _ffn_fwd(x_MxD, group_sizes_E, w_gate_up, w_down, ops):
  h, gu = ops.up(x_MxD, w_gate_up, group_sizes_E, save_gu=True)
  y = _typed_like(ops.down(h, w_down, group_sizes_E), x_MxD)
  return y, (x_MxD, group_sizes_E, w_gate_up, w_down, h, gu)


def _ffn_bwd(ops, res, dy_MxD):
  x_MxD, group_sizes_E, w_gate_up, w_down, h, gu = res
  dy_MxD = dy_MxD.astype(x_MxD.dtype)
  dgu = ops.down_bwd(dy_MxD, w_down, group_sizes_E, gu)
  dx = ops.hgmm(dgu, w_gate_up, group_sizes_E, transpose_rhs=True, lhs_split=True,
                out_cols=x_MxD.shape[1])
  d_wgu = ops.tgmm(x_MxD, dgu, group_sizes_E, [w.shape for w in w_gate_up],
                   rhs_split=True)
  d_wd = ops.tgmm(h, dy_MxD, group_sizes_E, [w.shape for w in w_down])
  return (_typed_like(dx, x_MxD), None,
          tuple(map(_typed_like, d_wgu, w_gate_up)), tuple(map(_typed_like, d_wd, w_down)))


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def check_args(x_MxD, group_sizes_E, w_gate_up, w_down):
  if len(w_gate_up) != len(w_down) or not w_gate_up:
    raise ValueError("w_gate_up and w_down need one array per group")
  m, d = x_MxD.shape
  n = w_gate_up[0].shape[0]
  for g, (wgu, wd) in enumerate(zip(w_gate_up, w_down)):
    width = wd.shape[1]
    if wgu.shape != (n, d, 2 * width) or wd.shape != (n, width, d):
      raise ValueError(f"group {g}: w_gate_up {wgu.shape} and w_down {wd.shape} do not "
                       f"match N={n}, d={d}")
    if wgu.dtype != x_MxD.dtype or wd.dtype != x_MxD.dtype:
      raise ValueError("weights must have the dtype of x")
  if group_sizes_E.shape != (n * len(w_gate_up),):
    raise ValueError(f"group_sizes has shape {group_sizes_E.shape}, want ({n * len(w_gate_up)},)")
  if not isinstance(group_sizes_E, jax.core.Tracer):
    # Concrete sizes are checked here; traced ones (inside jit) cannot be, and sizes that
    # are negative or sum past M give undefined results there.
    sizes = np.asarray(group_sizes_E)
    if (sizes < 0).any():
      raise ValueError(f"group_sizes must be >= 0; expert {int(np.argmin(sizes))} has "
                       f"{int(sizes.min())}")
    if sizes.sum() > m:
      raise ValueError(f"group_sizes sum to {int(sizes.sum())} rows but x has only {m}")


def expert_ffn_with(ops, x_MxD, group_sizes_E, w_gate_up, w_down):
  check_args(x_MxD, group_sizes_E, w_gate_up, w_down)
  return _ffn(x_MxD, group_sizes_E.astype(jnp.int32), tuple(w_gate_up), tuple(w_down), ops)
