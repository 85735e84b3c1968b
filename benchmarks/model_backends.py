"""The model's expert backends agree on a real model, and what each costs in a training
step's forward+backward (one GPU).

    python -m benchmarks.model_backends [--config configs/mohge_small.yaml] [--batch 8]
        [--backends pallas,tiled,ragged_dot] [--out FILE.json] [key=value ...]

Loss and gradients of every backend are compared with the first one's in the same run
(relative L2 over all parameter gradients); times are the median of repeats of the jitted
value_and_grad (forward output kept live).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mohge_jax import losses
from mohge_jax.config import load_config
from mohge_jax.model import Transformer


def rel_l2(a, b) -> float:
  a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)])
  b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/mohge_small.yaml")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--backends", default="pallas,tiled,ragged_dot")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default=None)
  ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.num_layers=3")
  args = ap.parse_args()

  backends = args.backends.split(",")
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 257, size=(args.batch, args.seq + 1)), jnp.int32)
  rows, results, ref = [], {}, None
  for backend in backends:
    cfg = load_config(args.config, [*args.overrides, f"model.expert_backend={backend}",
                                    f"train.seq_len={args.seq}"])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss_and_grad(params, tokens):
      def loss_fn(p):
        logits, aux = nnx.merge(graphdef, p)(tokens[:, :-1])
        lm, _ = losses.cross_entropy(logits, tokens[:, 1:])
        return lm + aux["group_aux"] + aux["expert_aux"]
      return jax.value_and_grad(loss_fn)(params)

    t0 = time.perf_counter()
    out = jax.block_until_ready(loss_and_grad(params, tokens))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(loss_and_grad(params, tokens))
      times.append(time.perf_counter() - t0)
    results[backend] = out
    ref = ref or out
    row = {"config": args.config, "backend": backend, "ms": 1e3 * float(np.median(times)),
           "compile_s": compile_s, "loss": float(out[0]),
           "loss_rel_err": abs(float(out[0]) - float(ref[0])) / abs(float(ref[0])),
           "grad_rel_l2": rel_l2(out[1], ref[1])}
    rows.append(row)
    print(json.dumps(row), flush=True)

  print(f"\n{'backend':<12}{'fwd+bwd ms':>12}{'loss':>10}{'loss err':>10}{'grad rel L2':>13}")
  for r in rows:
    print(f"{r['backend']:<12}{r['ms']:>12.2f}{r['loss']:>10.4f}{r['loss_rel_err']:>10.1e}"
          f"{r['grad_rel_l2']:>13.1e}")
  if args.out:
    meta = {"device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
            "batch": args.batch, "seq": args.seq, "overrides": args.overrides, "rows": rows}
    with open(args.out, "w") as f:
      json.dump(meta, f, indent=1)


if __name__ == "__main__":
  main()
