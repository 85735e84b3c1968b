"""The experimental MLA decode attention kernel (pallas_kernels/mla_decode_gpu.py) against
XLA's two latent-cache products (its jitted `reference`, what `attention.MLA.decode` runs),
one layer at MoHGE-3B's shapes (16 heads, latent 512 + rope 64), on one GPU.

    python -m benchmarks.mla_decode [--batches 256,32,1] [--slots 576] [--layers 16]
        [--splits auto,1] [--variants wgmma,pad8,pad8late,pad0late] [--reps 20] [--out FILE.json]

Per batch: random inputs with every slot visible; the kernel's error against the reference
in the same run (relative, bf16 outputs), then the median time of --reps calls of each,
and the fraction of the bandwidth limit: the bytes each must read (the cache's latent and
rope key once, q and the output) at 4.8 TB/s. Forward only: decoding is the use.
Each timed call runs --layers layers (each its own cache, as a decode step does) in one
jitted program and the time is reported per layer: a call of one layer is mostly the
host's dispatch (~0.07 ms on the H200, seventh session), as long as the layer itself.
--splits: the kernel's CTAs a row (auto: `mla_decode_gpu.default_splits`), a row each;
--variants, a row each: wgmma (the default kernel: both products on the warpgroup MMA,
transposed, operands from SMEM; wgmmaN: its copy ring of N boxes of 8 KB; wgmma[N]-PART:
a part skipped, `mla_decode(_ablate=PART)`: a wrong result, its time), and the warp-level
MMA form's SMEM row padding and copy issue: pad8 (rows padded against bank conflicts, a
step's copy issued when the step before starts), pad8late (the copy issued after the step
before's scores), pad0late (the unpadded layout of the first measurement).
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mla_decode_gpu as mdk

HBM_BYTES_PER_S = 4.8e12
H, C, R = 16, 512, 64


def median_seconds(f, args, reps):
  """f(*args) once to warm up, then the median wall time of `reps` calls (seconds)."""
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", default="256,32,1")
  ap.add_argument("--slots", type=int, default=576)
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--splits", default="auto,1")
  ap.add_argument("--variants", default="wgmma,pad8")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  S, L, scale = args.slots, args.layers, (128 + 64) ** -0.5
  ref = jax.jit(mdk.reference, static_argnums=5)

  def layers(attend):  # L layers' attention in one program, the outputs summed (kept live)
    def f(ql, qr, lat_L, kr_L, lengths):
      return sum(attend(ql, qr, lat_L[i], kr_L[i], lengths).astype(jnp.float32)
                 for i in range(L))
    return jax.jit(f)

  ref_L = layers(lambda *a: mdk.reference(*a, scale))
  rows = []
  print(f"{'batch':>6}{'slots':>7}{'splits':>7}{'variant':>9}{'rel err':>10}{'xla ms':>9}"
        f"{'kernel ms':>11}{'limit ms':>10}{'xla frac':>10}{'kernel frac':>12}{'speed-up':>10}"
        f"   (per layer, {L} a call)", flush=True)
  for B in (int(b) for b in args.batches.split(",")):
    bf = lambda *s, sd=1.0: jnp.asarray(sd * rng.normal(size=s), jnp.bfloat16)  # noqa: E731
    a = (bf(B, H, C, sd=C ** -0.5), bf(B, H, R, sd=R ** -0.5), bf(L, B, S, C), bf(L, B, S, R),
         jnp.full((B,), S, jnp.int32))
    one = (a[0], a[1], a[2][0], a[3][0], a[4])
    xla_ms = None
    resolved = {(mdk.default_splits(B, S) if sp == "auto" else int(sp)): sp
                for sp in reversed(args.splits.split(","))}  # each count once, first name
    for (splits, sp), var in ((k, v) for k in reversed(resolved.items())
                              for v in args.variants.split(",")):
      impl = "wgmma" if var.startswith("wgmma") else "mma"
      name, _, ablate = var.partition("-")
      ring = int(name[5:]) if impl == "wgmma" and name[5:] else None
      pad, early = ((mdk.ROW_PAD, True) if impl == "wgmma"
                    else (int(var[3]), not var.endswith("late")))
      row = {"batch": B, "slots": S, "splits": splits, "splits_arg": sp, "variant": var,
             "impl": impl, "ring": ring, "ablate": ablate, "row_pad": pad,
             "early_fetch": early, "layers_per_call": L}
      try:
        kern = functools.partial(mdk.mla_decode, scale=scale, splits=splits, row_pad=pad,
                                 early_fetch=early, impl=impl, ring=ring, _ablate=ablate)
        want = np.asarray(ref(*one, scale), np.float32)
        got = np.asarray(kern(*one), np.float32)
        row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        row["finite"] = bool(np.isfinite(got).all())
        if xla_ms is None:
          xla_ms = 1e3 * median_seconds(ref_L, a, args.reps) / L
        row["xla_ms"] = xla_ms
        row["kernel_ms"] = 1e3 * median_seconds(layers(kern), a, args.reps) / L
        nbytes = 2 * (B * S * (C + R) + 2 * B * H * C + B * H * R)  # bf16
        row["limit_ms"] = 1e3 * nbytes / HBM_BYTES_PER_S
        row["xla_fraction"] = row["limit_ms"] / row["xla_ms"]
        row["kernel_fraction"] = row["limit_ms"] / row["kernel_ms"]
        print(f"{B:>6}{S:>7}{splits:>7}{var:>9}{row['rel_err']:>10.2e}{row['xla_ms']:>9.3f}"
              f"{row['kernel_ms']:>11.3f}{row['limit_ms']:>10.3f}{row['xla_fraction']:>10.1%}"
              f"{row['kernel_fraction']:>12.1%}{row['xla_ms'] / row['kernel_ms']:>10.2f}",
              flush=True)
      except Exception as e:  # noqa: BLE001 - a failing row is a row; the next one runs
        row["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
        print(f"{B:>6}{S:>7}{sp:>7}{var:>9}  error: {row['error'][:300]}", flush=True)
      rows.append(row)
    if args.out:
      with open(args.out, "w") as fh:
        json.dump({"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                   "heads": H, "latent": C, "rope": R, "layers_per_call": L, "rows": rows},
                  fh, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
