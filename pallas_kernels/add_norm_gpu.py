"""A residual add and the RMSNorm after it in one GPU kernel (Pallas, Triton backend):

    h, n = add_rms_norm(x [M, D], a [M, D], scale [D], eps=..., out_dtype=...)

h = x + a (x's dtype: the residual stream), n = RMSNorm(h) = h32 * rsqrt(mean(h32^2) + eps)
* scale in out_dtype, h32 being h rounded to x's dtype and read back as float32: the same
numbers as `mohge_jax.attention.RMSNorm` applied to the add (up to the order of the mean's
sum).

Why: at decode XLA runs the residual add and the norm (a Triton normalisation fusion) as
two launches, twice a layer on the step's serial path (MoHGE-3B at batch 256 on the H200:
30 residual-add launches, 0.114 ms a step; benchmarks/notes_generate.md); here one.
Triton, not Mosaic GPU: a row's mean is a reduction along the row of a [rows, D] tile,
which Triton lowers directly. A program takes ROWS rows (D a power of two: Triton's
blocks). Reference: `reference` (plain JAX)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

ROWS = 8   # rows a program


def unsupported_reason(D: int) -> str | None:
  """Why a width D cannot run (None when it can)."""
  if D < 16 or D & (D - 1):
    return f"add_rms_norm: the width must be a power of two >= 16 (Triton's blocks), got {D}"
  return None


def _kernel(x_ref, a_ref, s_ref, h_ref, n_ref, *, eps: float):
  rows = pl.ds(pl.program_id(0) * ROWS, ROWS)
  h = (x_ref[rows, :].astype(jnp.float32) + a_ref[rows, :].astype(jnp.float32)).astype(
      h_ref.dtype)
  h_ref[rows, :] = h
  h32 = h.astype(jnp.float32)
  inv = lax.rsqrt(jnp.mean(h32 * h32, axis=1) + eps)
  n_ref[rows, :] = (h32 * inv[:, None] * s_ref[...][None, :]).astype(n_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "interpret"))
def add_rms_norm(x_MxD, a_MxD, scale_D, *, eps: float, out_dtype, interpret: bool = False):
  """See the module docstring. x, a: [M, D] (a cast to x's dtype first); scale: [D]
  (float32). interpret: Pallas' interpreter (CPU tests)."""
  M, D = x_MxD.shape
  if a_MxD.shape != (M, D) or scale_D.shape != (D,):
    raise ValueError(f"add_rms_norm: x and a must be [M, D] and scale [D]; got x "
                     f"{x_MxD.shape}, a {a_MxD.shape}, scale {scale_D.shape}")
  if reason := unsupported_reason(D):
    raise ValueError(reason)
  Mp = -(-M // ROWS) * ROWS
  pad = lambda t: t if Mp == M else jnp.pad(t, ((0, Mp - M), (0, 0)))  # noqa: E731
  h, n = pl.pallas_call(
      functools.partial(_kernel, eps=eps), grid=(Mp // ROWS,),
      out_shape=(jax.ShapeDtypeStruct((Mp, D), x_MxD.dtype),
                 jax.ShapeDtypeStruct((Mp, D), jnp.dtype(out_dtype))),
      compiler_params=plt.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
      name="add_rms_norm")(pad(x_MxD), pad(a_MxD.astype(x_MxD.dtype)),
                           scale_D.astype(jnp.float32))
  return h[:M], n[:M]


def reference(x_MxD, a_MxD, scale_D, *, eps: float, out_dtype):
  """The same in plain JAX (`attention.RMSNorm` on the add)."""
  h = x_MxD + a_MxD.astype(x_MxD.dtype)
  h32 = h.astype(jnp.float32)
  n = h32 * lax.rsqrt(jnp.mean(jnp.square(h32), axis=-1, keepdims=True) + eps)
  return h, (n * scale_D.astype(jnp.float32)).astype(out_dtype)
