"""Compile cost of the MoHGE-3B expert layer's fwd+bwd through the Mosaic GPU kernels.

    PYTHONUNBUFFERED=1 python -m benchmarks.kernel_compile [--out PATH] [--rows M]
        [--reps R] [--no-run] [--baseline DIR]

Builds value_and_grad of sum(y · ct) (random cotangent, bf16, y kept live) through
`expert_ffn` for d = 1024, 8 groups × 8 experts of widths 384…1280, M = 196,608 routed
rows (8 × 4096 tokens × top-6), group sizes a traced argument as in the model, and reports:

- trace and lower time, and the lowered module's size (chars of `.as_text()`); without a
  GPU it lowers for CUDA (`lowering_platforms=("cuda",)`) through the Mosaic GPU kernels,
  so the lowering cost can be measured on a CPU-only machine;
- with a GPU: compile time, fwd+bwd time (median of repeats), the max relative L2 error of
  y and every gradient against the float32 reference (backend="reference") in the same
  run, the cost of the weight flattening the kernels need (timed alone), and an equal-FLOP
  dense matmul fwd+bwd as the ratio baseline.

--baseline DIR runs the same measurement in a subprocess on the `pallas_kernels` package
found in DIR (e.g. an old version: `git archive main pallas_kernels | tar -x -C DIR`), and
puts both in the table. Prints as it goes; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

D = 1024
N = 8
WIDTHS = tuple(range(384, 1281, 128))
ROWS = 8 * 4096 * 6


def _log(*a):
  print(*a, flush=True)


def make_inputs(rows, seed=0):
  """Uniform routing over the 64 experts (all rows used), bf16 inputs."""
  rng = np.random.default_rng(seed)
  e = len(WIDTHS) * N
  sizes = rng.multinomial(rows, np.full(e, 1.0 / e)).astype(np.int32)
  key = jax.random.split(jax.random.PRNGKey(seed), 2 * len(WIDTHS) + 2)
  x = jax.random.normal(key[0], (rows, D), jnp.bfloat16)
  wgu = tuple((jax.random.normal(key[1 + i], (N, D, 2 * w), jnp.float32) / np.sqrt(D))
              .astype(jnp.bfloat16) for i, w in enumerate(WIDTHS))
  wd = tuple((jax.random.normal(key[1 + len(WIDTHS) + i], (N, w, D), jnp.float32) / np.sqrt(w))
             .astype(jnp.bfloat16) for i, w in enumerate(WIDTHS))
  ct = jax.random.normal(key[-1], (rows, D), jnp.bfloat16)
  flops = 6.0 * sum(int(sizes.reshape(len(WIDTHS), N)[g].sum()) * D * w
                    for g, w in enumerate(WIDTHS))
  return jnp.asarray(sizes), x, wgu, wd, ct, flops


def fwd_bwd(ffn):
  """(ct, x, wgu, wd, gs) → (loss, y, (dx, dwgu, dwd)), value_and_grad of sum(y·ct)."""
  def run(ct, x, wgu, wd, gs):
    def loss(x, wgu, wd):
      y = ffn(x, gs, wgu, wd)
      return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), y
    (val, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, wgu, wd)
    return val, y, grads
  return run


def kernel_ffn(on_gpu):
  """expert_ffn through the Mosaic GPU kernels (forced, so it also lowers on a CPU host)."""
  from pallas_kernels import ffn, gpu
  ops = gpu.GpuOps() if on_gpu else gpu.GpuOps(num_sms=132)
  return lambda x, gs, wgu, wd: ffn.expert_ffn_with(ops, x, gs, wgu, wd)


def measure_lowering(rows, on_gpu):
  gs, x, wgu, wd, ct, _ = (jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape")
                           else a for a in _shapes(rows))
  f = jax.jit(fwd_bwd(kernel_ffn(on_gpu)))
  t0 = time.perf_counter()
  traced = f.trace(ct, x, wgu, wd, gs)
  t_trace = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered = traced.lower() if on_gpu else traced.lower(lowering_platforms=("cuda",))
  t_lower = time.perf_counter() - t0
  text = lowered.as_text()
  res = dict(trace_s=t_trace, lower_s=t_lower, module_chars=len(text),
             mosaic_gpu_calls=text.count("mosaic_gpu"))
  _log(f"trace {t_trace:.2f} s, lower {t_lower:.2f} s, module {len(text):,} chars")
  return lowered, res


def _shapes(rows):
  e = len(WIDTHS) * N
  bf = jnp.bfloat16
  return (jax.ShapeDtypeStruct((e,), jnp.int32), jax.ShapeDtypeStruct((rows, D), bf),
          tuple(jax.ShapeDtypeStruct((N, D, 2 * w), bf) for w in WIDTHS),
          tuple(jax.ShapeDtypeStruct((N, w, D), bf) for w in WIDTHS),
          jax.ShapeDtypeStruct((rows, D), bf), None)


def bench(f, *args, reps=7):
  """Median seconds of `reps` timings (each of a few back-to-back calls)."""
  jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  once = time.perf_counter() - t0
  iters = max(1, min(20, int(0.2 / max(once, 1e-6))))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = f(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / iters)
  return float(np.median(ts))


def rel_err(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure_gpu(lowered, rows, reps):
  res = {}
  t0 = time.perf_counter()
  compiled = lowered.compile()
  res["compile_s"] = time.perf_counter() - t0
  _log(f"compile {res['compile_s']:.2f} s")
  gs, x, wgu, wd, ct, flops = make_inputs(rows)
  res["fwd_flops"] = flops
  t = bench(compiled, ct, x, wgu, wd, gs, reps=reps)
  res["fwd_bwd_ms"] = t * 1e3
  res["tflops"] = 3 * flops / t / 1e12
  _log(f"fwd+bwd {t * 1e3:.3f} ms = {res['tflops']:.1f} TFLOP/s")

  # correctness in the same run: float32 reference on the same (bf16-valued) inputs
  import pallas_kernels as pk
  _, y, grads = compiled(ct, x, wgu, wd, gs)
  f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  ref = jax.jit(fwd_bwd(lambda x, gs, a, b: pk.expert_ffn(x, gs, a, b, backend="reference")))
  t0 = time.perf_counter()
  _, y_r, grads_r = ref(f32(ct), f32(x), f32(wgu), f32(wd), gs)
  jax.block_until_ready(y_r)
  _log(f"reference (float32) compiled and ran in {time.perf_counter() - t0:.1f} s")
  errs = {"y": rel_err(y, y_r), "dx": rel_err(grads[0], grads_r[0]),
          "dw_gate_up": max(rel_err(a, b) for a, b in zip(grads[1], grads_r[1])),
          "dw_down": max(rel_err(a, b) for a, b in zip(grads[2], grads_r[2]))}
  errs["max"] = max(errs.values())
  total = int(np.asarray(gs).sum())
  errs["pad_rows_zero"] = bool(total == rows or not np.asarray(y[total:], np.float32).any())
  res["rel_err"] = errs
  _log(f"max relative L2 error vs float32 reference: {errs}")
  del y_r, grads_r

  # the weight flattening the new kernels do per call, timed alone (0 for kernels without it)
  from pallas_kernels import gpu
  if hasattr(gpu, "flatten_weights"):
    flat = jax.jit(lambda a, b: gpu.flatten_weights(a, b))
    res["flatten_ms"] = bench(flat, wgu, wd, reps=reps) * 1e3
    _log(f"weight flattening alone: {res['flatten_ms']:.3f} ms")

  # equal-FLOP dense baseline (as benchmarks/kernels.py): [M, D] @ [D, F] with
  # 2·M·D·F = the layer's forward FLOPs, fwd+bwd by vjp with a random cotangent
  ncols = int(round(flops / (2.0 * rows * D) / 128)) * 128
  w = jax.random.normal(jax.random.PRNGKey(9), (D, ncols), jnp.bfloat16)
  ctd = jax.random.normal(jax.random.PRNGKey(10), (rows, ncols), jnp.bfloat16)

  def dense(ct, a, b):
    y, vjp = jax.vjp(lambda a, b: a @ b, a, b)
    return y, vjp(ct)
  td = bench(jax.jit(dense), ctd, x, w, reps=reps) * flops / (2.0 * rows * D * ncols)
  res["dense_fwd_bwd_ms"] = td * 1e3
  res["x_dense"] = td / t
  _log(f"dense equal-FLOP fwd+bwd {td * 1e3:.3f} ms; kernels at {td / t:.2f}x dense")
  return res


def run_here(args):
  on_gpu = jax.default_backend() == "gpu"
  _log("jax", jax.__version__, jax.devices())
  import pallas_kernels
  res = dict(package=os.path.dirname(pallas_kernels.__file__), rows=args.rows)
  lowered, low = measure_lowering(args.rows, on_gpu)
  res.update(low)
  if on_gpu and not args.no_run:
    res.update(measure_gpu(lowered, args.rows, args.reps))
  return res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  ap.add_argument("--rows", type=int, default=ROWS)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--no-run", action="store_true", help="lower (and no compile/run) only")
  ap.add_argument("--baseline", default=None,
                  help="dir holding another pallas_kernels package, measured in a subprocess")
  ap.add_argument("--baseline-timeout", type=float, default=200)
  ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()

  results = {}
  if args.baseline:
    _log(f"== baseline: pallas_kernels from {args.baseline}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.abspath(args.baseline), os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))]), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "benchmarks.kernel_compile", "--json-only",
           "--rows", str(args.rows), "--reps", str(args.reps)] + (
               ["--no-run"] if args.no_run else [])
    try:
      p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         timeout=args.baseline_timeout)
      sys.stdout.write("".join("  | " + l + "\n" for l in p.stdout.splitlines()[:-1]))
      if p.returncode:
        _log(p.stderr[-3000:])
      results["baseline"] = json.loads(p.stdout.splitlines()[-1])
    except Exception as e:  # keep the new kernels' numbers
      _log(f"baseline failed: {type(e).__name__}: {str(e)[:500]}")
  _log(f"== kernels under test")
  here = run_here(args)
  if args.json_only:
    print(json.dumps(here))
    return
  results["current"] = here

  keys = ["trace_s", "lower_s", "module_chars", "compile_s", "fwd_bwd_ms", "tflops",
          "x_dense", "flatten_ms"]
  _log("\n| kernels | " + " | ".join(keys) + " | max rel err |")
  _log("| --- |" + " ---: |" * (len(keys) + 1))
  for name, r in results.items():
    cells = []
    for k in keys:
      v = r.get(k)
      cells.append("-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.3f}"))
    err = r.get("rel_err", {}).get("max")
    _log(f"| {name} | " + " | ".join(cells) + f" | {'-' if err is None else f'{err:.2e}'} |")
  dev = jax.devices()[0]
  out = dict(device=getattr(dev, "device_kind", str(dev)), jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(), **results)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
      json.dump(out, fh, indent=1)
    _log("wrote", args.out)


if __name__ == "__main__":
  main()
