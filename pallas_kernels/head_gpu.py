"""Greedy decoding's output layer as one Mosaic GPU kernel: the logits' GEMM with each row's
maximum and its index kept in the epilogue, so the [B, V] float32 logits never reach memory.

    tokens_B, best_B = greedy_head(x [B, D], w [D, V], vocab_size)   (reference: `reference`)

tokens_B[b] = argmax over v < vocab_size of x[b] . w[:, v] (float32 accumulation; ties:
the lowest id, as `jnp.argmax`), best_B its value. (A row whose best is NaN gets the id V,
out of range, where `jnp.argmax` gives the NaN's position: a model past repair either way.)

Why: at a decode batch of 256 the output layer of MoHGE-3B (D = 1024, V = 130,688) is
68.5 GFLOP and 267 MB of weights; XLA runs it as a cuBLAS GEMM that writes 134 MB of
float32 logits (113 us on the H200) and then an argmax that reads them back (37 us)
(benchmarks/notes_generate.md, twenty-sixth session's profile). Greedy decoding needs only
each row's best id.

Layout of the work (after `jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`): a
persistent kernel, one CTA an SM, walking column tiles of `tile_n` vocabulary entries; a
CTA tile is all of x's rows (up to 2 * 128: two compute warpgroups, 128 rows each) by
`tile_n` columns, its K loop a warp-specialized TMA pipeline (a third warpgroup issues the
copies) of `tile_k`-deep steps, wgmma into a float32 accumulator [128, tile_n] per
warpgroup. x is read once a tile (from L2), w once. The epilogue masks columns >=
vocab_size, takes each row's maximum and the lowest column holding it, and writes the two
[rows] vectors of the tile by TMA: partials [V / tile_n, B]. An XLA reduction over the
tiles picks each row's best (the lowest tile on ties, so the lowest id overall).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WG_ROWS = 128        # rows of x a compute warpgroup holds (its accumulator [128, tile_n])
TILE_N = 128         # vocabulary columns a CTA tile
TILE_K = 64          # contraction depth a pipeline step (128 bytes of bf16: the swizzle)
STEPS = 4            # pipeline steps in flight
H200_SMS = 132       # CTAs when no GPU is attached (lowering for CUDA on a CPU host)
# generate.greedy_tokens(head="auto") takes the kernel from this batch: it computes 256 rows
# whatever the batch, ~0.12 ms on the H200, where XLA's logits and argmax take 0.167 ms at
# 256 rows, 0.093 at 32 and 0.075 at 1 (twenty-seventh session, benchmarks/head.py).
AUTO_MIN_BATCH = 128


def reference(x_BxD: jax.Array, w_DxV: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """(tokens_B int32, best_B float32): argmax of the float32-accumulated logits over the
  first vocab_size columns."""
  logits_BxV = jnp.dot(x_BxD, w_DxV, preferred_element_type=jnp.float32)[:, :vocab_size]
  tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return tokens_B, jnp.take_along_axis(logits_BxV, tokens_B[:, None], axis=-1)[:, 0]


def unsupported_reason(B: int, D: int, V: int, dtype, *, tile_n: int = TILE_N,
                       tile_k: int = TILE_K) -> str | None:
  """Why `greedy_head` cannot take these shapes (None: it can)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype)}: bf16 or f16 only"
  if not 1 <= B <= 2 * WG_ROWS:
    return f"batch {B}: 1 to {2 * WG_ROWS} rows"
  if D % tile_k:
    return f"width {D} is not a multiple of tile_k={tile_k}"
  if V % tile_n:
    return f"vocabulary {V} (padded) is not a multiple of tile_n={tile_n}"
  return None


def greedy_head(x_BxD: jax.Array, w_DxV: jax.Array, vocab_size: int, *,
                tile_n: int = TILE_N, tile_k: int = TILE_K, steps: int = STEPS,
                num_ctas: int | None = None,
                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(tokens_B int32, best_B float32) as `reference`, without writing the logits (module
  docstring). x and w bf16 (or f16), w's columns >= vocab_size ignored. num_ctas: the
  persistent grid (None: the GPU's SMs, 132 without a GPU)."""
  B, D = x_BxD.shape
  D2, V = w_DxV.shape
  if D2 != D or x_BxD.dtype != w_DxV.dtype:
    raise ValueError(f"greedy_head: x {x_BxD.dtype}{list(x_BxD.shape)} and w "
                     f"{w_DxV.dtype}{list(w_DxV.shape)} do not multiply")
  if not 0 < vocab_size <= V:
    raise ValueError(f"greedy_head: vocab_size={vocab_size} must be in 1..{V} (w's columns)")
  reason = unsupported_reason(B, D, V, x_BxD.dtype, tile_n=tile_n, tile_k=tile_k)
  if reason:
    raise ValueError(f"greedy_head: {reason}")
  if num_ctas is None:
    dev = jax.devices()[0]
    num_ctas = dev.core_count if dev.platform == "gpu" else H200_SMS
  rows = 2 * WG_ROWS   # x padded to both warpgroups' rows (the padding's rows are dropped)
  x_pad = jnp.zeros((rows, D), x_BxD.dtype).at[:B].set(x_BxD)
  best_TxR, ids_TxR = _greedy_head(x_pad, w_DxV, vocab_size=vocab_size, tile_n=tile_n,
                                   tile_k=tile_k, steps=steps, num_ctas=num_ctas,
                                   interpret=interpret)
  tile_T = jnp.argmax(best_TxR[:, :B], axis=0)   # the first tile holding the row's best
  cols = jnp.arange(B)
  return ids_TxR[tile_T, cols], best_TxR[tile_T, cols]


@functools.partial(jax.jit, static_argnames=("vocab_size", "tile_n", "tile_k", "steps",
                                             "num_ctas", "interpret"))
def _greedy_head(x_RxD, w_DxV, *, vocab_size, tile_n, tile_k, steps, num_ctas, interpret):
  R, D = x_RxD.shape
  V = w_DxV.shape[1]
  dtype = x_RxD.dtype
  tiles = V // tile_n
  swizzle = plgpu.find_swizzle(tile_k * jnp.dtype(dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))

  def greedy_head_kernel(x_gmem, w_gmem, best_gmem, ids_gmem):
    def pipeline(body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(D // tile_k,), memory_registers=40,
          in_specs=[plgpu.BlockSpec((R, tile_k), lambda k: (0, k), transforms=transforms,
                                    memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((tile_k, tile_n), lambda k: (k, 0), transforms=transforms,
                                    memory_space=plgpu.SMEM)],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
          compute_context=compute_context)

    ignore = lambda *_, **__: None  # noqa: E731 (the allocations only)

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
        best_smem=plgpu.SMEM((2, WG_ROWS), jnp.float32),
        ids_smem=plgpu.SMEM((2, WG_ROWS), jnp.int32),
        collective_axes="wg")
    def _scope(allocs, best_smem, ids_smem):
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * WG_ROWS, WG_ROWS)   # this warpgroup's rows of the CTA tile

      @plgpu.nd_loop((tiles,), collective_axes="sm")
      def _tile_loop(info):
        (n,) = info.index

        def compute_context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((WG_ROWS, tile_n), jnp.float32))
          def _acc_scope(acc_ref):
            eval_pipeline(acc_ref)
            logits = acc_ref[...]
            col = n * tile_n + plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, tile_n), 1,
                                                      layout=plgpu.Layout.WGMMA)
            logits = jnp.where(col < vocab_size, logits, -jnp.inf)
            best = logits.max(axis=1)
            at_best = logits == lax.broadcast_in_dim(best, (WG_ROWS, tile_n), (0,))
            ids = jnp.where(at_best, col, jnp.int32(V)).min(axis=1)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile's vectors out
            best_smem[wg] = best
            ids_smem[wg] = ids
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(best_smem.at[wg], best_gmem.at[n, rows])
            plgpu.copy_smem_to_gmem(ids_smem.at[wg], ids_gmem.at[n, rows])

        def mma(_, x_smem, w_smem, acc_ref):
          plgpu.wgmma(acc_ref, x_smem.at[rows], w_smem)
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(mma, compute_context)(x_gmem, w_gmem.at[:, pl.ds(n * tile_n, tile_n)],
                                       allocations=allocs)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  return plgpu.kernel(
      greedy_head_kernel,
      out_type=(jax.ShapeDtypeStruct((tiles, R), jnp.float32),
                jax.ShapeDtypeStruct((tiles, R), jnp.int32)),
      grid=(num_ctas,), grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None)(x_RxD, w_DxV)
