"""Which building blocks of the planned DSA sparse-attention kernel lower with Mosaic GPU
(Hopper), on a CPU: `lower(lowering_platforms=("cuda",))`. Not a kernel, and nothing runs:
one 64-key step for one query, as benchmarks/notes_dsa.md plans it (keys as the wgmma M
dimension, the query's H heads as N).

    python -m benchmarks.dsa_mgpu_probe            # every variant, one line each

Variants (`--only NAME` for one):
  qk        S^T [64 keys, H] = K_sel [64, 64] . q^T (q [H, 64] in SMEM, transposed view)
  qk_max0   ... and the per-head max over keys (a reduction over the M axis)
  gather    ... with K_sel gathered in the kernel: 64 one-row TMA copies at run-time rows
            into an untiled staging buffer, then registers -> the swizzled wgmma operand
            (a one-row TMA straight into the tiled/swizzled buffer is refused: slices of a
            tiled SMEM ref must be multiples of the 8-row tile)
  pv        O^T [64 latent, H] = K_sel^T . P^T with P^T [64 keys, H] stored to SMEM as the
            B operand
Measured with jax 0.11.2 (this checkout): qk, qk_max0 and gather lower for H = 16; pv lowers
for H = 64 only (H = 16 or 32, i.e. a 32 or 64 byte swizzle on the B operand, fails Mosaic
GPU's layout inference).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

KEYS = 64  # keys per step (wgmma M)
DIM = 64   # one 128-byte column tile of the latent (576 = 9 of them in MoHGE-3B)


def _transforms(cols, dtype=jnp.bfloat16):
  swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def step_kernel(variant: str, heads: int):
  def body(ckr_gmem, q_gmem, idx_gmem, out_gmem, k_smem, q_smem, p_smem, stage, idx_smem, bar):
    plgpu.copy_gmem_to_smem(q_gmem, q_smem, bar.at[0])
    if variant == "gather":
      plgpu.copy_gmem_to_smem(idx_gmem, idx_smem, bar.at[1])
      plgpu.barrier_wait(bar.at[1])
      for i in range(KEYS):
        plgpu.copy_gmem_to_smem(ckr_gmem.at[pl.ds(idx_smem[i], 1)], stage.at[pl.ds(i, 1)],
                                bar.at[2])
      plgpu.barrier_wait(bar.at[2])
      k_smem[...] = stage[...]
      plgpu.commit_smem()
    else:
      plgpu.copy_gmem_to_smem(ckr_gmem.at[pl.ds(0, KEYS)], k_smem, bar.at[2])
      plgpu.barrier_wait(bar.at[2])
    plgpu.barrier_wait(bar.at[0])

    def qk(acc):
      plgpu.wgmma(acc, k_smem, q_smem.transpose((1, 0)))
      return acc[...]
    s_t = pl.run_scoped(qk, plgpu.ACC((KEYS, heads), jnp.float32))
    if variant in ("qk_max0", "pv"):
      m = s_t.max(axis=0)
      s_t = jnp.exp(s_t - jax.lax.broadcast_in_dim(m, s_t.shape, [1]))
    p_smem[...] = s_t.astype(jnp.bfloat16)
    plgpu.commit_smem()
    if variant == "pv":
      def pv(acc):
        plgpu.wgmma(acc, k_smem.transpose((1, 0)), p_smem)
        return acc[...]
      o_t = pl.run_scoped(pv, plgpu.ACC((DIM, heads), jnp.float32))
      p_smem[...] = o_t.astype(jnp.bfloat16)
      plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(p_smem, out_gmem)
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((KEYS, heads), jnp.bfloat16), grid=(1,),
      grid_names=("x",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      scratch_types=[plgpu.SMEM((KEYS, DIM), jnp.bfloat16, transforms=_transforms(DIM)),
                     plgpu.SMEM((heads, DIM), jnp.bfloat16, transforms=_transforms(DIM)),
                     plgpu.SMEM((KEYS, heads), jnp.bfloat16, transforms=_transforms(heads)),
                     plgpu.SMEM((KEYS, DIM), jnp.bfloat16),
                     plgpu.SMEM((KEYS,), jnp.int32),
                     plgpu.Barrier(num_barriers=3)])


def lowers(variant: str, heads: int, rows: int = 256) -> str:
  args = (jax.ShapeDtypeStruct((rows, DIM), jnp.bfloat16),
          jax.ShapeDtypeStruct((heads, DIM), jnp.bfloat16),
          jax.ShapeDtypeStruct((KEYS,), jnp.int32))
  try:
    low = jax.jit(step_kernel(variant, heads)).trace(*args).lower(lowering_platforms=("cuda",))
    return f"lowers ({len(low.as_text()):,} chars)"
  except Exception as e:  # noqa: BLE001 -- the point is to report what fails
    return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default=None)
  args = p.parse_args()
  for variant in ("qk", "qk_max0", "gather", "pv"):
    if args.only and variant != args.only:
      continue
    for heads in (16, 32, 64):
      print(f"{variant:8s} H={heads:3d}: {lowers(variant, heads)}", flush=True)


if __name__ == "__main__":
  main()
