"""Expert-layer grouped-matmul benchmark: pallas (ours) vs tokamax vs ragged_dot vs dense.

    python -m benchmarks.kernels [--sweep] [--quick] [--out PATH]

Runs on one GPU (the H200 for benchmarks/results/kernels_h200.json); prints a table and
writes JSON rows {"case", "impl", "pass", "ms", "tflops"} plus correctness checks of the
pallas path against the reference, measured in the same run. TFLOP/s counts useful
FLOPs (2·M·K·N per matmul; forward+backward = 3× forward). Forward+backward uses a
random cotangent and keeps the forward output live (as /work/shared/bench/anchors.md).
tokamax is optional: per-group `tokamax.ragged_dot(..., implementation="mosaic")` calls.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import gpu

D = 1024
ROWS = 32768 * 6          # 8 × 4096 tokens, top-6
MOHGE_WIDTHS = tuple(range(384, 1281, 128))


def bench(f, *args, reps=7):
  out = f(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  once = time.perf_counter() - t0
  iters = max(1, min(20, int(0.2 / max(once, 1e-6))))
  reps = reps if once < 0.05 else 3
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = f(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / iters)
  return float(np.median(ts))


def make_case(name, widths, experts_per_group, rows, routing, seed=0):
  """Returns dict with per-group inputs and the concatenated pallas inputs."""
  rng = np.random.default_rng(seed)
  g = len(widths)
  e = g * experts_per_group
  if routing == "uniform":
    sizes = np.concatenate([rng.multinomial(rows // g, np.full(experts_per_group,
                                                               1.0 / experts_per_group))
                            for _ in range(g)])
  else:  # skewed: a few experts take most rows, several get none
    p = rng.dirichlet(np.full(e, 0.3))
    p[rng.choice(e, e // 8, replace=False)] = 0
    sizes = rng.multinomial(rows, p / p.sum())
  sizes_g = sizes.reshape(g, experts_per_group)
  key = jax.random.PRNGKey(seed)
  ks = jax.random.split(key, 3 * g + 2)
  x = jax.random.normal(ks[0], (rows, D), jnp.bfloat16)
  wgu = tuple((jax.random.normal(ks[1 + i], (experts_per_group, D, 2 * w), jnp.float32)
               / np.sqrt(D)).astype(jnp.bfloat16) for i, w in enumerate(widths))
  wd = tuple((jax.random.normal(ks[1 + g + i], (experts_per_group, w, D), jnp.float32)
              / np.sqrt(w)).astype(jnp.bfloat16) for i, w in enumerate(widths))
  ct = jax.random.normal(ks[-1], (rows, D), jnp.bfloat16)
  row_ends = np.cumsum(sizes_g.sum(1))
  row_starts = row_ends - sizes_g.sum(1)
  fwd_flops = sum(6.0 * int(sizes_g[i].sum()) * D * w for i, w in enumerate(widths))
  return dict(name=name, widths=widths, gs=jnp.asarray(sizes, jnp.int32), x=x, wgu=wgu,
              wd=wd, ct=ct, sizes_g=sizes_g, row_starts=row_starts, row_ends=row_ends,
              flops=fwd_flops)


def fwd_bwd(f):
  def run(ct, *args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(ct)
  return jax.jit(run)


def per_group_ffn(rd, case):
  """The layer as per-group calls of a ragged matmul `rd(x, w, group_sizes)`."""
  starts, ends = case["row_starts"], case["row_ends"]
  gsg = [jnp.asarray(s, jnp.int32) for s in case["sizes_g"]]

  def f(x, wgu, wd):
    ys = []
    for i, (a, b) in enumerate(zip(wgu, wd)):
      xg = x[int(starts[i]):int(ends[i])]
      if xg.shape[0] == 0:
        continue
      h = rd(xg, a, gsg[i])
      w = b.shape[1]
      h = (jax.nn.silu(h[:, :w].astype(jnp.float32)) * h[:, w:]).astype(x.dtype)
      ys.append(rd(h, b, gsg[i]))
    return jnp.concatenate(ys, 0)
  return f


@functools.lru_cache(None)
def _pallas_fns(tuning):
  """Jitted forward and forward+backward of expert_ffn (group sizes traced), cached so
  cases of equal shapes share one compilation."""
  tuning = dict(tuning)
  backend = tuning.pop("backend", "mosaic_gpu")
  ffn = lambda x, wgu, wd, gs: pk.expert_ffn(x, gs, wgu, wd, backend=backend, **tuning)

  def fb(ct, x, wgu, wd, gs):
    y, vjp = jax.vjp(lambda *a: ffn(*a, gs), x, wgu, wd)
    return y, vjp(ct)
  return jax.jit(ffn), jax.jit(fb)


def rel_err(a, b):
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def run_case(case, cfg, impls, rows_out, checks, do_check=True):
  name, gs, x, wgu, wd, ct = (case[k] for k in ("name", "gs", "x", "wgu", "wd", "ct"))
  fl = case["flops"]

  def rec(impl, pas, secs):
    flops = fl if pas == "fwd" else 3 * fl
    row = dict(case=name, impl=impl, **{"pass": pas}, ms=secs * 1e3,
               tflops=flops / secs / 1e12)
    rows_out.append(row)
    print(f"{name:34s} {impl:10s} {pas:8s} {secs * 1e3:9.3f} ms {row['tflops']:7.1f} TFLOP/s",
          flush=True)

  if "pallas" in impls:
    try:
      f, fb = _pallas_fns(tuple(sorted(dataclasses_asdict(cfg).items())))
      rec("pallas", "fwd", bench(f, x, wgu, wd, gs))
      rec("pallas", "fwd+bwd", bench(fb, ct, x, wgu, wd, gs))
      if do_check:
        y, grads = fb(ct, x, wgu, wd, gs)
        y_r, grads_r = _pallas_fns((("backend", "reference"),))[1](ct, x, wgu, wd, gs)
        errs = {"y": rel_err(y, y_r), "dx": rel_err(grads[0], grads_r[0]),
                "dw_gate_up": max(rel_err(a, b) for a, b in zip(grads[1], grads_r[1])),
                "dw_down": max(rel_err(a, b) for a, b in zip(grads[2], grads_r[2]))}
        total = int(case["gs"].sum())
        errs["pad_rows_zero"] = bool(total == x.shape[0] or not jnp.any(y[total:]))
        checks.append(dict(case=name, **errs))
        print(f"  check vs reference: {errs}", flush=True)
    except Exception as e:  # keep the other rows
      print(f"pallas failed on {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
  for impl, rd in impls.items():
    if impl == "pallas" or rd is None:
      continue
    try:
      f = per_group_ffn(rd, case)
      rec(impl, "fwd", bench(jax.jit(f), x, wgu, wd))
      rec(impl, "fwd+bwd", bench(fwd_bwd(f), ct, x, wgu, wd))
    except Exception as e:
      print(f"{impl} failed on {name}: {type(e).__name__}: {str(e)[:500]}", flush=True)
  # dense matmul of equal FLOPs: [rows, d] @ [d, F] with 2·rows·d·F = forward FLOPs
  ncols = int(round(fl / (2.0 * x.shape[0] * D) / 128)) * 128
  w = jax.random.normal(jax.random.PRNGKey(9), (D, ncols), jnp.bfloat16)
  dense_fl = 2.0 * x.shape[0] * D * ncols
  scale = fl / dense_fl
  t = bench(jax.jit(lambda a, b: a @ b), x, w)
  rec("dense", "fwd", t * scale)
  ctd = jax.random.normal(jax.random.PRNGKey(10), (x.shape[0], ncols), jnp.bfloat16)
  t = bench(fwd_bwd(lambda a, b: a @ b), ctd, x, w)
  rec("dense", "fwd+bwd", t * scale)


def dataclasses_asdict(cfg):
  import dataclasses
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "interpret"}


def cases(quick=False):
  rows = ROWS // (8 if quick else 1)
  return [
      make_case("MoHGE-3B expert layer", MOHGE_WIDTHS, 8, rows, "uniform", 100),
      make_case("MoE-3B expert layer", (1024,), 64, rows, "uniform", 101),
      make_case("MoHGE-3B skewed routing", MOHGE_WIDTHS, 8, rows, "skewed", 102),
      make_case("MoHGE-3B small batch (768 rows)", MOHGE_WIDTHS, 8, 768, "uniform", 103),
  ]


SWEEP = [
    gpu.Config(),
    gpu.Config(bm=128, bn=128, bk=64, steps=3, bn_up=64),
    gpu.Config(bm=64, bn=128, bk=64, steps=4, bn_up=128),
    gpu.Config(bm=128, bn=64, bk=64, steps=4),
    gpu.Config(bt=128, steps_t=3),
]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sweep", action="store_true", help="time several tile configs first")
  ap.add_argument("--quick", action="store_true", help="1/8 of the rows")
  ap.add_argument("--no-slow", action="store_true", help="skip lax.ragged_dot")
  ap.add_argument("--out", default=None)
  ap.add_argument("--cases", default=None, help="comma-separated case indices (default all)")
  ap.add_argument("--impls", default=None, help="comma-separated subset of "
                  "pallas,tokamax,ragged_dot (dense always runs)")
  args = ap.parse_args()
  print("jax", jax.__version__, jax.devices(), flush=True)
  impls = {"pallas": None}
  try:
    import tokamax
    impls["tokamax"] = lambda a, b, c: tokamax.ragged_dot(a, b, c, implementation="mosaic")
  except Exception as e:
    print("tokamax unavailable:", repr(e)[:300], flush=True)
  if not args.no_slow:
    impls["ragged_dot"] = jax.lax.ragged_dot
  if args.impls:
    impls = {k: v for k, v in impls.items() if k in args.impls.split(",")}
  all_cases = cases(args.quick)
  if args.cases:
    all_cases = [all_cases[int(i)] for i in args.cases.split(",")]
  cfg = gpu.Config()
  sweep_rows = []
  if args.sweep:
    best = None
    for c in SWEEP:
      rows = []
      try:
        run_case(all_cases[0], c, {"pallas": None}, rows, [], do_check=False)
      except Exception as e:
        print("config failed", c, repr(e)[:300])
        continue
      t = [r["ms"] for r in rows if r["impl"] == "pallas" and r["pass"] == "fwd+bwd"]
      if t:
        print("  config", c, "fwd+bwd", t[0], flush=True)
        sweep_rows.append(dict(config=dataclasses_asdict(c), rows=rows))
        if best is None or t[0] < best[0]:
          best = (t[0], c)
    if best:
      cfg = best[1]
  print("config:", cfg, flush=True)
  rows, checks = [], []
  for case in all_cases:
    run_case(case, cfg, impls, rows, checks)
  dev = jax.devices()[0]
  result = dict(device=getattr(dev, "device_kind", str(dev)), jax_version=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                config=dataclasses_asdict(cfg), rows=rows, checks=checks, sweep=sweep_rows)
  print("\n| case | impl | pass | ms | TFLOP/s | × tokamax | × dense |")
  print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    ref = {i: next((q["ms"] for q in rows if q["case"] == r["case"] and q["pass"] == r["pass"]
                    and q["impl"] == i), None) for i in ("tokamax", "dense")}
    ratio = lambda i: f"{ref[i] / r['ms']:.2f}" if ref[i] else "-"
    print(f"| {r['case']} | {r['impl']} | {r['pass']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
          f"{ratio('tokamax')} | {ratio('dense')} |")
  out = args.out or os.path.join(os.path.dirname(__file__), "results", "kernels_h200.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
