"""What the padding rows of expert parallelism's buffers cost the expert kernels (one GPU).

    python -m benchmarks.ep_padding [--tokens 131072] [--reps 5] [--out PATH]

At EP 2 each rank's expert buffer holds the dropless worst case, 2*T*K rows, of which
~T*K are its own (all-size placement, balanced routing) and the rest padding. The Mosaic
kernels zeroed the padding rows (in every matmul of the forward, its rematerialisation and
the backward); `Config.zero_padding=False` skips them and `expert_parallel._local_ffn`
masks them instead. On the H200s the EP 2 step's expert kernels took 755 ms against one
GPU's 516 ms for the same routed rows (benchmarks/results/multi_gpu_h200x2_profile.txt).

Rows, MoHGE-3B's local experts at EP 2 (8 groups x 4 experts, widths 384..1280, d 1024),
fwd+bwd through `expert_parallel._local_ffn`'s path (bf16), median of --reps:
- `dense rows`: M = T*K rows, no padding (one GPU's buffer);
- `padded, zeroed`: M = 2*T*K, the second half padding, kernels zero it (before);
- `padded, skipped`: the same buffer, kernels skip it, two selects mask it (now).
The skipped row's outputs and gradients are checked against the dense rows' (same real
rows) in the same run. Writes {rows: [{case, ms, vs_dense}], check: {...}}.
"""
from __future__ import annotations

import argparse
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench
from mohge_jax import dispatch

D, N, WIDTHS, K = 1024, 4, tuple(range(384, 1281, 128)), 6


def layer(zero_padding: bool, masked: bool):
  def loss(x, sizes, wgu, wd, ct):
    valid = (jnp.arange(x.shape[0]) < jnp.sum(sizes))[:, None]
    if masked:
      x = jnp.where(valid, x, jnp.zeros((), x.dtype))
    y = dispatch.grouped_ffn(x, sizes, wgu, wd, backend="pallas", zero_padding=zero_padding)
    if masked:
      y = jnp.where(valid, y, jnp.zeros((), y.dtype))
    return jnp.sum(y.astype(jnp.float32) * ct), y

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3), has_aux=True))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokens", type=int, default=32 * 4096, help="tokens per GPU (T)")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = args.tokens * K
  E = len(WIDTHS) * N
  sizes = jnp.asarray(rng.multinomial(rows, np.full(E, 1 / E)), jnp.int32)
  bf = lambda *s, sd=1.0: jnp.asarray(sd * rng.standard_normal(s, np.float32), jnp.bfloat16)  # noqa: E731
  wgu = [bf(N, D, 2 * w, sd=D ** -0.5) for w in WIDTHS]
  wd = [bf(N, w, D, sd=w ** -0.5) for w in WIDTHS]
  x, ct = bf(2 * rows, D), bf(2 * rows, D)
  cases = {"dense rows": (layer(True, False), rows),
           "padded, zeroed": (layer(True, False), 2 * rows),
           "padded, skipped": (layer(False, True), 2 * rows)}
  out, results = [], {}
  for name, (f, m) in cases.items():
    a = (x[:m], sizes, wgu, wd, ct[:m])
    results[name] = jax.tree.map(np.asarray, f(*a))
    ms = 1e3 * bench(f, *a, reps=args.reps)
    out.append({"case": name, "rows": m, "real_rows": rows, "ms": ms})
    print(f"{name:<18}{m:>10,} rows{ms:>10.2f} ms", flush=True)
  for r in out:
    r["vs_dense"] = r["ms"] / out[0]["ms"]
  (_, y0), (dx0, dwgu0, dwd0) = results["dense rows"]
  (_, y1), (dx1, dwgu1, dwd1) = results["padded, skipped"]
  rel = lambda a, b: float(np.linalg.norm(np.float32(a) - np.float32(b))  # noqa: E731
                           / max(np.linalg.norm(np.float32(b)), 1e-30))
  check = {"y": rel(y1[:rows], y0), "dx": rel(dx1[:rows], dx0),
           "dw_gate_up": max(rel(a, b) for a, b in zip(dwgu1, dwgu0)),
           "dw_down": max(rel(a, b) for a, b in zip(dwd1, dwd0)),
           "padding_zero": bool(not np.float32(y1[rows:]).any() and not np.float32(dx1[rows:]).any())}
  check["ok"] = check["padding_zero"] and max(v for k, v in check.items()
                                              if k not in ("padding_zero",)) < 1e-2
  print(json.dumps(check))
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"what": "expert kernels fwd+bwd with EP 2's padding rows (benchmarks/ep_padding.py)",
                 "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                 "date": datetime.date.today().isoformat(), "tokens": args.tokens,
                 "rows": out, "check": check}, fh, indent=1)
  return 0 if check["ok"] else 1


if __name__ == "__main__":
  raise SystemExit(main())
