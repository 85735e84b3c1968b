"""Fused heterogeneous grouped-expert kernels (MoHGE) with one backend-choosing entry point.

    expert_ffn(x_MxD, group_sizes_E, w_gate_up, w_down, *, backend="auto", **tuning)

backend: "auto" (Mosaic GPU on Hopper, Mosaic TPU on TPU, reference elsewhere),
"reference", "mosaic_gpu", "mosaic_tpu", or "interpret" (the Mosaic TPU kernels run by
the Pallas interpreter, for tests on CPU). Lower-level blocks: hgmm, tgmm (reference.py
says what they compute, with a pure-JAX reference for each).
"""
from __future__ import annotations

import jax

from pallas_kernels import reference
from pallas_kernels.ffn import Ops, expert_ffn_with

BACKENDS = ("auto", "reference", "mosaic_gpu", "mosaic_tpu", "interpret")


def _is_hopper():
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  if dev.platform != "gpu":
    return False
  cc = str(getattr(dev, "compute_capability", ""))
  kind = getattr(dev, "device_kind", "")
  return cc.startswith("9.") or any(h in kind for h in ("H100", "H200", "H800", "H20"))


def resolve_backend(backend="auto"):
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform == "tpu":
    return "mosaic_tpu"
  if platform == "gpu" and _is_hopper():
    return "mosaic_gpu"
  return "reference"


def unsupported_reason(widths, d_model, backend="auto") -> str | None:
  """None if `backend` runs expert widths `widths` with model width `d_model`, else why not."""
  if resolve_backend(backend) == "mosaic_gpu":
    from pallas_kernels import gpu
    return gpu.unsupported_reason(widths, d_model)
  return None


def get_ops(backend="auto", **tuning) -> Ops:
  backend = resolve_backend(backend)
  if backend == "reference":
    return Ops(**tuning)
  if backend in ("mosaic_tpu", "interpret"):
    from pallas_kernels import tpu
    return tpu.TpuOps(interpret=backend == "interpret", **tuning)
  from pallas_kernels import gpu
  return gpu.GpuOps(**tuning)


def expert_ffn(x_MxD, group_sizes_E, w_gate_up, w_down, *, backend="auto", **tuning):
  """y[row] = (silu(x@Wg) * (x@Wu)) @ Wd for the row's expert; padding rows → 0 (with the
  GPU kernels' tuning zero_padding=False: undefined, in y and in the gradient of x).

  x_MxD: [M, d] rows sorted by expert (group-major expert order); group_sizes_E: int32
  [G·N]; w_gate_up: G arrays [N, d, 2·W_g] (gate ‖ up); w_down: G arrays [N, W_g, d].
  Differentiable in x and the weights (custom_vjp). Group sizes must be >= 0 and sum to at
  most M: checked when they are concrete, undefined when they are traced inside jit.
  """
  return expert_ffn_with(get_ops(backend, **tuning), x_MxD, group_sizes_E, w_gate_up,
                         w_down)


def hgmm(lhs, rhs, group_sizes, *, backend="auto", **kw):
  """Row-ragged heterogeneous grouped matmul (see reference.hgmm_ref)."""
  return get_ops(backend).hgmm(lhs, tuple(rhs), group_sizes, **kw)


def tgmm(lhs, rhs, group_sizes, shapes, *, backend="auto", **kw):
  """Per-expert lhsᵀ·rhs over each expert's rows (see reference.tgmm_ref)."""
  return get_ops(backend).tgmm(lhs, rhs, group_sizes, [tuple(s) for s in shapes], **kw)


__all__ = ["expert_ffn", "hgmm", "tgmm", "get_ops", "resolve_backend", "unsupported_reason",
           "reference",
           "BACKENDS"]
