"""How fast TMA streams a decode cache into SMEM on this GPU with nothing computed: the
ceiling for the decode kernels (`mla_decode_gpu`'s copies alone ran at ~55% of 4.8 TB/s,
`slot_gpu`'s at ~68%, twelfth session), against XLA reading the same bytes once.

    python -m benchmarks.tma_stream [--batch 256] [--slots 576] [--cols 512] [--layers 16]
        [--reps 20] [--variants row64x18,persist64x18,...,xla_sum] [--out FILE.json]

The cache: --layers arrays [batch, slots, cols] bf16 (MoHGE-3B's latent cache at batch 256
by default: 151 MB a layer), one program reading all of them; the time is per layer, the
median of --reps calls, the rate its bytes over that time. Variants (a row each):

  rowRxN       grid (batch,): a CTA streams one cache row in boxes of [R slots, 64 columns]
               (tiled and 128-byte swizzled, as the kernels' wgmma operands), a ring of N
               boxes, each refilled as soon as it has landed (the mla_decode pattern: R=64)
  persistRxN   grid (132,): CTA i streams rows i, i+132, ..., the ring running on across
               rows (no fill and drain a row, no second wave)
  flatRxN      as rowRxN with unswizzled boxes of [R, 256] (4x wider, no wgmma layout)
  xla_sum      XLA: the cache summed over its slots (one read, a reduction)
  xla_sumall   XLA: the cache summed whole (one read, a row-major reduction)
  xla_add      XLA: x + 1 (a read and a write: its rate counts both)
"""
from __future__ import annotations

import argparse
import json
import re

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.mla_decode import median_seconds

HBM_BYTES_PER_S = 4.8e12
SMS = 132  # the H200's streaming multiprocessors


def stream(x_BxSxC, *, box_rows: int, box_cols: int, ring: int, persistent: bool,
           swizzle: bool, interpret: bool = False):
  """Every byte of x through SMEM by TMA (see the module docstring); returns the last
  box of each CTA (so the program has an output). interpret: the Pallas GPU interpreter."""
  B, S, C = x_BxSxC.shape
  if S % box_rows or C % box_cols:
    raise ValueError(f"boxes [{box_rows}, {box_cols}] must tile [{S}, {C}]")
  across = C // box_cols
  per_row = (S // box_rows) * across  # boxes a row
  ctas = min(B, SMS) if persistent else B
  transforms = ((plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)) if swizzle
                else ())

  def kernel(x_ref, o_ref, buf, bars):
    i = lax.axis_index("i")
    rows = (B - i + ctas - 1) // ctas  # rows i, i + ctas, ...
    total = rows * per_row

    def fetch(g):  # this CTA's g-th box into ring slot g % ring
      k, r = g // per_row, g % per_row
      s, c = r // across, r % across
      plgpu.copy_gmem_to_smem(
          x_ref.at[i + k * ctas, pl.ds(s * box_rows, box_rows), pl.ds(c * box_cols, box_cols)],
          buf.at[g % ring], bars.at[g % ring])

    for g in range(ring):
      pl.when(g < total)(lambda g=g: fetch(g))

    def body(g, carry):
      plgpu.barrier_wait(bars.at[g % ring])
      pl.when(g + ring < total)(lambda: fetch(g + ring))
      return carry

    lax.fori_loop(0, total, body, 0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(buf.at[(total - 1) % ring], o_ref.at[i])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((ctas, box_rows, box_cols), x_BxSxC.dtype),
      grid=(ctas,), grid_names=("i",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      scratch_types=[plgpu.SMEM((ring, box_rows, box_cols), x_BxSxC.dtype,
                                transforms=transforms),
                     plgpu.Barrier(num_barriers=ring)],
  )(x_BxSxC)


def variant(name: str):
  """A variant's name -> its function of one layer's cache (see the module docstring)."""
  if name == "xla_sum":
    return lambda x: jnp.sum(x, axis=1, dtype=jnp.float32)
  if name == "xla_sumall":
    return lambda x: jnp.sum(x, dtype=jnp.float32)
  if name == "xla_add":  # reads and writes: twice the bytes (counted so)
    return lambda x: x + jnp.ones((), x.dtype)
  m = re.fullmatch(r"(row|persist|flat)(\d+)x(\d+)", name)
  if not m:
    raise ValueError(f"unknown variant {name!r}: rowRxN, persistRxN, flatRxN or xla_sum")
  kind, rows, ring = m.group(1), int(m.group(2)), int(m.group(3))
  return lambda x: stream(x, box_rows=rows, box_cols=256 if kind == "flat" else 64,
                          ring=ring, persistent=kind == "persist", swizzle=kind != "flat")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--slots", type=int, default=576)
  ap.add_argument("--cols", type=int, default=512)
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--variants", default="xla_sum,row64x9,row64x18,row64x24,persist64x18,"
                                        "persist64x24,row192x6,persist192x8,flat64x4,xla_sum")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  B, S, C, L = args.batch, args.slots, args.cols, args.layers
  caches = [jax.random.normal(jax.random.key(i), (B, S, C), jnp.bfloat16) for i in range(L)]
  nbytes = B * S * C * 2
  rows = []
  print(f"{'variant':>16}{'ms/layer':>10}{'TB/s':>8}{'of 4.8':>8}   "
        f"([{B}, {S}, {C}] bf16, {nbytes / 1e6:.0f} MB a layer, {L} a call)", flush=True)
  for name in args.variants.split(","):
    row = {"variant": name, "batch": B, "slots": S, "cols": C, "layers_per_call": L}
    try:
      f = variant(name)
      prog = jax.jit(lambda cs, f=f: [f(c) for c in cs])
      row["ms"] = 1e3 * median_seconds(prog, (caches,), args.reps) / L
      row["tb_per_s"] = nbytes * (2 if name == "xla_add" else 1) / row["ms"] / 1e9
      row["fraction"] = row["tb_per_s"] * 1e12 / HBM_BYTES_PER_S
      print(f"{name:>16}{row['ms']:>10.4f}{row['tb_per_s']:>8.2f}{row['fraction']:>8.1%}",
            flush=True)
    except Exception as e:  # noqa: BLE001 - a failing variant is a row; the next one runs
      row["error"] = f"{type(e).__name__}: {str(e)[:800]}"
      print(f"{name:>16}  error: {row['error'][:300]}", flush=True)
    rows.append(row)
    if args.out:
      with open(args.out, "w") as fh:
        json.dump({"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                   "rows": rows}, fh, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
