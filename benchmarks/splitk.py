"""Decode's dense projections: `splitk_gpu.splitk_matmul` against XLA's product.

    python -m benchmarks.splitk [--rows 256,128] [--reps 20] [--layers 15]
        [--out benchmarks/results/splitk_h200.json]

Per shape (MoHGE-3B's MLA projections at decode: input [1024, 3648], q_nope [1024, 2048],
output [2048, 1024]) and batch M: one jitted function runs the product over --layers
distinct weight matrices (as a decode step's layers do, so the weights come from HBM, not
L2), one after another (each product's input passed through an optimization barrier with
the product before: a chain, as in a decode step), compiled with the decode programs'
options (`generate.decode_compiler_options`: the products in one CUDA graph, no launch
from the host between them), timed --reps times after a warm-up; us a product = median
run time / layers. XLA's
`jnp.dot` (its split-K and partial sums included) against the kernel at each split and
ring depth that the shape takes; the ratio is XLA's time over the kernel's (above 1: the
kernel is faster). Each kernel output is checked against XLA's in the same run (max
error relative to the output's scale; bf16 rounding ~4e-3), and against itself run twice
(the cluster sums in a fixed order). Needs a Hopper GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mohge_jax import generate as gen
from pallas_kernels import splitk_gpu as sk

SHAPES = {"mla_in": (1024, 3648), "q_nope": (1024, 2048), "mla_out": (2048, 1024)}


def _time(fn, args, reps):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)), times


def _compile(mm, x, ws):
  """The chain of products over ws, compiled as decode compiles its step."""
  def chain(x, ws):
    ys = []
    for w in ws:
      y = mm(x, w)
      x, y = jax.lax.optimization_barrier((x, y))   # the next product after this one
      ys.append(y)
    return ys
  return jax.jit(chain).lower(x, ws).compile(
      compiler_options=gen.decode_compiler_options() or None)


def run(rows, reps, layers, out):
  rng = np.random.default_rng(0)
  results = []
  for M in rows:
    for name, (K, N) in SHAPES.items():
      x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
      ws = [jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), jnp.bfloat16)
            for _ in range(layers)]
      xla = _compile(lambda x, w: jnp.dot(x, w), x, ws)
      t_xla, _ = _time(xla, (x, ws), reps)
      want = np.asarray(xla(x, ws)[0], np.float32)
      scale = float(np.abs(want).max())
      row = {"shape": name, "M": M, "K": K, "N": N, "xla_us": 1e6 * t_xla / layers}
      print(f"M={M} {name} [{K}, {N}]: xla {row['xla_us']:.2f} us", flush=True)
      results.append(row)
      for splits, depth in [(s, d) for s in (1, 2, 4, 8) for d in (2, 3)]:
        if sk.unsupported_reason(M, K, N, jnp.bfloat16, splits=splits, depth=depth):
          continue
        key = dict(row, splits=splits, depth=depth)
        name_v = f"splits {splits} depth {depth}"
        try:
          f = _compile(lambda x, w, s=splits, d=depth: sk.splitk_matmul(
              x, w, splits=s, depth=d), x, ws)
          t, _ = _time(f, (x, ws), reps)
          y1, y2 = (np.asarray(f(x, ws)[0], np.float32) for _ in range(2))
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, the rest run
          r = dict(key, error=f"{type(e).__name__}: {e}"[:500])
          print(f"   {name_v}: {r['error']}", flush=True)
          results.append(r)
          continue
        r = dict(key, kernel_us=1e6 * t / layers, ratio=t_xla / t,
                 max_rel_err=float(np.abs(y1 - want).max() / scale),
                 repeat_equal=bool(np.array_equal(y1, y2)), ctas=(N // 64) * splits)
        results.append(r)
        print(f"   {name_v} ({r['ctas']} CTAs): {r['kernel_us']:.2f} us, {r['ratio']:.2f}x "
              f"xla, err {r['max_rel_err']:.1e}, repeat {r['repeat_equal']}", flush=True)
      if out:
        _write(out, results)
  return results


def _write(out, results):
  dev = jax.devices()[0]
  with open(out, "w") as f:
    json.dump({"device": getattr(dev, "device_kind", str(dev)), "jax_version": jax.__version__,
               "date": datetime.date.today().isoformat(),
               "command": "python -m benchmarks.splitk " + " ".join(sys.argv[1:]),
               "rows": results}, f, indent=1)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", default="256,128")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--layers", type=int, default=15)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "splitk_h200.json"))
  args = ap.parse_args(argv)
  run([int(r) for r in args.rows.split(",")], args.reps, args.layers, args.out)


if __name__ == "__main__":
  main()
