"""Compile cost of the MoHGE-3B expert layer's fwd+bwd through the Mosaic GPU kernels.

    PYTHONUNBUFFERED=1 python -m benchmarks.kernel_compile [--out PATH] [--baseline DIR]

Builds value_and_grad of sum(y · ct) (random cotangent, y kept live) through `expert_ffn`
for d = 1024, 8 groups × 8 experts of widths 384…1280, M = 196,608 routed rows
(8 × 4096 tokens × top-6), bf16, group sizes a traced argument as in the model, and reports

- trace and lower time and the lowered module's size (chars of `.as_text()`); without a
  GPU it lowers for CUDA (`lowering_platforms=("cuda",)`) through the Mosaic GPU kernels,
  so the lowering cost can be measured on a CPU-only machine;
- with a GPU: compile time, the first call's time (in case a kernel is compiled lazily),
  fwd+bwd time (median of repeats), the relative L2 error of y and of every gradient
  against the float32 reference (backend="reference", same bf16-valued inputs) in the
  same run, the weight stacking the kernels do per call timed alone, and an equal-FLOP
  dense matmul fwd+bwd (as benchmarks/kernels.py) as the ratio baseline.

--baseline DIR measures another `pallas_kernels` package (the directory holding it, e.g.
`mkdir -p .bench_old && git archive main pallas_kernels | tar -x -C .bench_old`) in a
subprocess first, without the reference check, and puts both in the table. Prints as it
goes; writes JSON to --out. --smoke: the script's own plumbing on CPU (reference ops,
small M), for testing the script without a GPU.
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

from benchmarks.kernels import bench  # median time per call, as the kernel benchmark

D = 1024
N = 8
WIDTHS = tuple(range(384, 1281, 128))
ROWS = 8 * 4096 * 6


def _log(*a):
  print(*a, flush=True)


def make_inputs(rows, seed=0):
  """Uniform routing over the 64 experts (every row routed), bf16."""
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
  flops = 6.0 * sum(int(s) * D * w for s, w in zip(sizes.reshape(len(WIDTHS), N).sum(1), WIDTHS))
  return jnp.asarray(sizes), x, wgu, wd, ct, flops


def input_shapes(rows):
  s = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  bf = jnp.bfloat16
  return (s(jnp.zeros((rows, D), bf)), s(jnp.zeros((rows, D), bf)),
          tuple(jax.ShapeDtypeStruct((N, D, 2 * w), bf) for w in WIDTHS),
          tuple(jax.ShapeDtypeStruct((N, w, D), bf) for w in WIDTHS),
          jax.ShapeDtypeStruct((len(WIDTHS) * N,), jnp.int32))


def fwd_bwd(ffn):
  """(ct, x, wgu, wd, gs) → (loss, y, (dx, dwgu, dwd)): value_and_grad of sum(y·ct)."""
  def run(ct, x, wgu, wd, gs):
    def loss(x, wgu, wd):
      y = ffn(x, gs, wgu, wd)
      return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), y
    (val, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, wgu, wd)
    return val, y, grads
  return run


def kernel_ffn(mode):
  """expert_ffn through the Mosaic GPU kernels, forced (so it also lowers on a CPU host);
  mode "smoke": the reference ops instead."""
  from pallas_kernels import ffn, gpu
  ops = {"gpu": lambda: gpu.GpuOps(), "cpu": lambda: gpu.GpuOps(num_sms=132),
         "smoke": lambda: ffn.Ops()}[mode]()
  return lambda x, gs, wgu, wd: ffn.expert_ffn_with(ops, x, gs, wgu, wd)


def measure_lowering(rows, mode):
  f = jax.jit(fwd_bwd(kernel_ffn(mode)))
  t0 = time.perf_counter()
  traced = f.trace(*input_shapes(rows))
  t_trace = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered = traced.lower(lowering_platforms=("cuda",)) if mode == "cpu" else traced.lower()
  t_lower = time.perf_counter() - t0
  text = lowered.as_text()
  res = dict(trace_s=t_trace, lower_s=t_lower, module_chars=len(text),
             mosaic_gpu_calls=text.count("custom_call @mosaic_gpu"))
  _log(f"trace {t_trace:.2f} s, lower {t_lower:.2f} s, module {len(text):,} chars, "
       f"{res['mosaic_gpu_calls']} Mosaic GPU calls")
  return lowered, res


def rel_err(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure_run(lowered, rows, reps, check):
  res = {}
  t0 = time.perf_counter()
  compiled = lowered.compile()
  res["compile_s"] = time.perf_counter() - t0
  _log(f"compile {res['compile_s']:.2f} s")
  gs, x, wgu, wd, ct, flops = make_inputs(rows)
  jax.block_until_ready((x, wgu, wd, ct))
  t0 = time.perf_counter()
  _, y, grads = jax.block_until_ready(compiled(ct, x, wgu, wd, gs))
  res["first_call_s"] = time.perf_counter() - t0
  _log(f"first call {res['first_call_s']:.3f} s")
  t = bench(compiled, ct, x, wgu, wd, gs, reps=reps)
  res["fwd_flops"] = flops
  res["fwd_bwd_ms"] = t * 1e3
  res["tflops"] = 3 * flops / t / 1e12
  _log(f"fwd+bwd {t * 1e3:.3f} ms = {res['tflops']:.1f} TFLOP/s")

  if check:  # float32 reference on the same (bf16-valued) inputs, in this run
    import pallas_kernels as pk
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
    ref = jax.jit(fwd_bwd(lambda x, gs, a, b: pk.expert_ffn(x, gs, a, b, backend="reference")))
    t0 = time.perf_counter()
    _, y_r, grads_r = jax.block_until_ready(ref(f32(ct), f32(x), f32(wgu), f32(wd), gs))
    _log(f"float32 reference compiled and ran in {time.perf_counter() - t0:.1f} s")
    errs = {"y": rel_err(y, y_r), "dx": rel_err(grads[0], grads_r[0]),
            "dw_gate_up": max(rel_err(a, b) for a, b in zip(grads[1], grads_r[1])),
            "dw_down": max(rel_err(a, b) for a, b in zip(grads[2], grads_r[2]))}
    errs["max"] = max(errs.values())
    res["rel_err"] = errs
    res["finite"] = bool(all(np.isfinite(np.asarray(a, np.float32)).all()
                             for a in jax.tree.leaves((y, grads))))
    _log("relative L2 error vs float32 reference: "
         + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f"; all finite: {res['finite']}")
    del y_r, grads_r
  del y, grads

  # the weight stacking the kernels need, timed alone (kernels without it: not reported)
  from pallas_kernels import gpu
  if hasattr(gpu, "flatten_weights"):
    res["stack_weights_ms"] = bench(jax.jit(gpu.flatten_weights), wgu, wd, reps=reps) * 1e3
    _log(f"weight stacking alone: {res['stack_weights_ms']:.3f} ms")

  # equal-FLOP dense baseline (as benchmarks/kernels.py): [M, D] @ [D, F] with
  # 2·M·D·F = the layer's forward FLOPs; fwd+bwd by vjp with a random cotangent
  ncols = max(128, int(round(flops / (2.0 * rows * D) / 128)) * 128)
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
  mode = "smoke" if args.smoke else ("gpu" if on_gpu else "cpu")
  import pallas_kernels
  res = dict(package=os.path.dirname(os.path.abspath(pallas_kernels.__file__)), rows=args.rows)
  _log(f"jax {jax.__version__} {jax.devices()} mode {mode}; kernels from {res['package']}")
  lowered, low = measure_lowering(args.rows, mode)
  res.update(low)
  if mode != "cpu" and not args.no_run:
    res.update(measure_run(lowered, args.rows, args.reps, not args.no_check))
  return res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=None)
  ap.add_argument("--rows", type=int, default=None, help=f"routed rows (default {ROWS:,})")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--no-run", action="store_true", help="lower only (no compile or run)")
  ap.add_argument("--no-check", action="store_true", help="skip the reference check")
  ap.add_argument("--baseline", default=None,
                  help="dir holding another pallas_kernels package, measured in a subprocess")
  ap.add_argument("--baseline-timeout", type=float, default=200)
  ap.add_argument("--smoke", action="store_true", help="CPU test of this script (reference ops)")
  ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.rows is None:
    args.rows = 512 if args.smoke else ROWS

  results = {}
  if args.baseline:
    _log(f"== baseline: pallas_kernels from {args.baseline}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([os.path.abspath(args.baseline), repo]))
    cmd = [sys.executable, "-m", "benchmarks.kernel_compile", "--json-only", "--no-check",
           "--rows", str(args.rows), "--reps", str(args.reps)]
    cmd += ["--no-run"] * args.no_run + ["--smoke"] * args.smoke
    try:
      # cwd = the baseline dir: `python -m` puts the cwd first on sys.path
      p = subprocess.run(cmd, env=env, cwd=os.path.abspath(args.baseline),
                         capture_output=True, text=True,
                         timeout=args.baseline_timeout)
      lines = p.stdout.splitlines()
      sys.stdout.write("".join(f"  | {l}\n" for l in lines[:-1]))
      if p.returncode:
        _log(p.stderr[-3000:])
      results["baseline"] = json.loads(lines[-1])
    except Exception as e:  # keep the kernels under test
      _log(f"baseline failed: {type(e).__name__}: {str(e)[:500]}")
  _log("== kernels under test")
  here = run_here(args)
  if args.json_only:
    print(json.dumps(here))
    return
  results["current"] = here

  keys = ["trace_s", "lower_s", "module_chars", "compile_s", "first_call_s", "fwd_bwd_ms",
          "tflops", "x_dense", "stack_weights_ms"]
  _log("\n| kernels | " + " | ".join(keys) + " | max rel err |")
  _log("| --- |" + " ---: |" * (len(keys) + 1))
  for name, r in results.items():
    cells = [("-" if r.get(k) is None else
              f"{r[k]:,}" if isinstance(r[k], int) else f"{r[k]:.3f}") for k in keys]
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
