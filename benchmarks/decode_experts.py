"""The routed experts of one decode step, by backend, against their bandwidth limit (issue 15).

    python -m benchmarks.decode_experts [--config configs/mohge_3b.yaml] [--batches 256,64]
        [--backends capacity,capacity_kernel,all_experts] [--reps 20] [--out FILE.json]

Per batch: every routed layer of the config (its own random bf16 weights, as a decode step
reads them) in one jitted program, each layer's input the normalised output of the one
before; routes drawn uniformly (each token K distinct experts, softmax weights), per
layer. Backends (`dispatch`): `capacity` (XLA: per group one batched product, 8 launches a
layer for each projection in MoHGE-3B), `capacity_kernel` (the same slot block through the
Mosaic GPU kernels with weights stacked once before the timed calls,
`dispatch.stack_experts`), `all_experts`. The kernels' error against `capacity` is in the
same run (relative max error of the first layer's output: the later layers' inputs drift
apart through the chain). The limit: the bytes of the experts
the routes hit (3 d W_g each, bf16) at 4.8 TB/s; the step's time is the median of --reps
calls. Forward only: decoding is the use.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import parse_tuning
from benchmarks.mla_decode import median_seconds
from mohge_jax import dispatch
from mohge_jax.config import load_config

HBM_BYTES_PER_S = 4.8e12


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/mohge_3b.yaml")
  ap.add_argument("--batches", default="256,64")
  ap.add_argument("--backends", default="capacity,capacity_kernel,all_experts")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--interpret", action="store_true", help="the kernels in the interpreter")
  ap.add_argument("--tunings", default="default",
                  help="capacity_kernel rows, one per tuning: 'default' or gpu.Config fields "
                       "and kernel=slot|hgmm as name=value joined by '+' (e.g. steps=6, "
                       "kernel=hgmm+bk=128)")
  ap.add_argument("--parts", action="store_true",
                  help="also time the slot kernel's up and down projections apart, with and "
                       "without their products (_ablate=no_mma: the copies alone), on "
                       "fixed slot blocks, each against its own weights' bandwidth limit")
  ap.add_argument("--layers", type=int, default=0, help="routed layers (0: the config's)")
  ap.add_argument("--out", default=None)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  cfg = load_config(args.config, args.overrides)
  m = cfg.model
  L = args.layers or sum(k != "dense" for k in m.ffn_kinds)
  N, D, E, K = m.experts_per_group, m.d_model, m.num_experts, m.top_k
  key = jax.random.key(0)
  std = m.init_std
  w_gate_up, w_down = [], []
  for layer in range(L):
    kl = jax.random.fold_in(key, layer)
    w_gate_up.append([(std * jax.random.normal(jax.random.fold_in(kl, g), (N, D, 2 * w))
                       ).astype(jnp.bfloat16) for g, w in enumerate(m.group_widths)])
    w_down.append([(std * jax.random.normal(jax.random.fold_in(kl, 100 + g), (N, w, D))
                    ).astype(jnp.bfloat16) for g, w in enumerate(m.group_widths)])
  bytes_E = np.repeat(3 * D * np.asarray(m.group_widths, np.float64) * 2, N)
  tunings = {}
  for t in args.tunings.split(","):
    tunings[t] = {} if t == "default" else parse_tuning(t)
  print(f"{args.config}: {L} routed layers, E={E}, K={K}, widths {list(m.group_widths)}",
        flush=True)

  def program(backend):
    def f(x_TxD, ids_LxTxK, w_LxTxK, w_gate_up, w_down, stacked):
      ys = []
      for layer in range(L):
        if backend == "all_experts":
          y = dispatch.all_experts(x_TxD, ids_LxTxK[layer], w_LxTxK[layer], w_gate_up[layer],
                                   w_down[layer])
        else:
          y = dispatch.capacity_experts(
              x_TxD, ids_LxTxK[layer], w_LxTxK[layer], w_gate_up[layer], w_down[layer],
              stacked=stacked[layer] if backend == "capacity_kernel" else None)
        ys.append(y)
        x_TxD = (y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6)
                 ).astype(jnp.bfloat16)
      return jnp.stack(ys)
    return jax.jit(f)

  rows = []
  for B in [int(b) for b in args.batches.split(",")]:
    kb = jax.random.fold_in(key, 10_000 + B)
    x = jax.random.normal(kb, (B, D), jnp.float32).astype(jnp.bfloat16)
    logits = jax.random.normal(jax.random.fold_in(kb, 1), (L, B, E))
    ids = jax.lax.top_k(logits, K)[1].astype(jnp.int32)  # uniform: K distinct experts
    wts = jax.nn.softmax(jax.random.normal(jax.random.fold_in(kb, 2), (L, B, K)), -1)
    ids_np = np.asarray(ids)
    hit = np.zeros((L, E), bool)
    hit[np.arange(L)[:, None], ids_np.reshape(L, -1)] = True
    limit_ms = float((hit * bytes_E).sum()) / HBM_BYTES_PER_S * 1e3
    counts = np.stack([np.bincount(ids_np[i].ravel(), minlength=E) for i in range(L)])
    outs = {}
    runs = [(b, None) for b in args.backends.split(",") if b != "capacity_kernel"]
    if "capacity_kernel" in args.backends.split(","):
      runs[1:1] = [("capacity_kernel", t) for t in tunings]
    for backend, tuning in runs:
      stacked = None
      if tuning is not None:
        stack = jax.jit(lambda gu, d, kw=tunings[tuning]: dispatch.stack_experts(
            gu, d, interpret=args.interpret, **kw))
        stacked = [stack(gu, d) for gu, d in zip(w_gate_up, w_down)]
      f = program(backend)
      fargs = (x, ids, wts, w_gate_up, w_down, stacked)
      t0 = time.perf_counter()
      out = jax.block_until_ready(f(*fargs))
      compile_s = time.perf_counter() - t0
      outs[backend] = np.asarray(out[0], np.float32)  # the first layer: later ones
      # amplify bf16 rounding through the normalisation chain (all_experts too)
      ms = median_seconds(f, fargs, args.reps) * 1e3
      name = backend if tuning is None else f"{backend}[{tuning}]"
      row = {"config": args.config, "batch": B, "backend": name, "layers": L,
             "ms": ms, "ms_per_layer": ms / L, "limit_ms": limit_ms,
             "fraction_of_bandwidth": limit_ms / ms, "first_call_s": compile_s,
             "max_rows_per_expert": int(counts.max()),
             "capacity": dispatch.expert_capacity(B, K, E)}
      if backend != "capacity" and "capacity" in outs:
        ref = outs["capacity"]
        row["rel_err_vs_capacity"] = float(np.max(np.abs(outs[backend] - ref))
                                           / np.max(np.abs(ref)))
      rows.append(row)
      print(f"  batch {B:4d} {name:28s} {ms:8.3f} ms ({ms / L:.4f} a layer)  "
            f"{100 * limit_ms / ms:5.1f}% of {limit_ms:.3f} ms"
            + (f"  err {row['rel_err_vs_capacity']:.2e}" if "rel_err_vs_capacity" in row
               else ""), flush=True)
      if args.parts and stacked is not None and stacked[0].kernel == "slot":
        for part in _parts(stacked, B, K, E, D, args.reps, key):
          rows.append({"config": args.config, "batch": B, "layers": L,
                       "backend": f"{part.pop('part')}[{tuning}]{part.pop('ablate')}", **part})
          print(f"  batch {B:4d} {rows[-1]['backend']:28s} {rows[-1]['ms']:8.3f} ms  "
                f"{100 * rows[-1]['fraction_of_bandwidth']:5.1f}% of "
                f"{rows[-1]['limit_ms']:.3f} ms", flush=True)
      del stacked
      _write(args, rows)
  return 0


def _write(args, rows):
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                 "date": datetime.date.today().isoformat(), "rows": rows}, fh, indent=1)


def _parts(stacked, B, K, E, D, reps, key):
  """The slot kernel's two projections timed apart over all layers (`--parts`), each on a
  fixed random slot block (C rows an expert, as capacity_experts sizes it at batch B), with
  and without the products: dicts of part, ablate, ms and the fraction of that
  projection's weight bytes at 4.8 TB/s."""
  from pallas_kernels import slot_gpu
  s0 = stacked[0]
  C = -(-dispatch.expert_capacity(B, K, E) // s0.tile_rows) * s0.tile_rows
  W = max(q for _, q in s0.gate_up_layout.shapes) // 2
  cfg = s0.config()
  x = jax.random.normal(jax.random.fold_in(key, 7), (E * C, D), jnp.float32).astype(jnp.bfloat16)
  h = jax.random.normal(jax.random.fold_in(key, 8), (E * C, W), jnp.float32).astype(jnp.bfloat16)
  out = []
  for part, swiglu, lhs in (("slot_up", True, x), ("slot_down", False, h)):
    mats = [s.gate_up if swiglu else s.down for s in stacked]
    layout = s0.gate_up_layout if swiglu else s0.down_layout   # the same for every layer
    weight_bytes = sum(m.size * m.dtype.itemsize for m in mats)
    for ablate in ("", "no_mma"):
      def f(lhs, mats, ablate=ablate, swiglu=swiglu, layout=layout):  # an output corner
        return jnp.stack([slot_gpu.slot_gmm(lhs, (m, layout), rows_per_expert=C,  # (no DCE)
                                            swiglu=swiglu, out_cols=W if swiglu else D,
                                            cfg=cfg, _ablate=ablate)[0, 0] for m in mats])
      f = jax.jit(f)
      jax.block_until_ready(f(lhs, mats))
      ms = median_seconds(f, (lhs, mats), reps) * 1e3
      limit_ms = weight_bytes / HBM_BYTES_PER_S * 1e3
      out.append({"part": part, "ablate": ":no_mma" if ablate else "", "ms": ms,
                  "limit_ms": limit_ms, "fraction_of_bandwidth": limit_ms / ms})
  return out


if __name__ == "__main__":
  raise SystemExit(main())
