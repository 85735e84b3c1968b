"""Greedy decoding's output layer on the GPU: XLA's logits and argmax against the fused kernel
(`pallas_kernels.head_gpu.greedy_head`), at MoHGE-3B's width and vocabulary.

    python -m benchmarks.head [--batches 256,32,1] [--tiles 128x4,128x3] [--reps 7]
        [--out benchmarks/results/head_h200.json] [--interpret --d-model 128 --vocab 500
        --vocab-padded 512]

Per batch: the time of one output layer (`benchmarks.kernels.bench`: median over --reps
of a loop of calls, each call's result not waited for; the committed rows: loops of 20), for XLA (`jnp.dot` with float32 output, then argmax over the
valid vocabulary: what `generate.greedy_tokens` runs with head="xla") and for the kernel at
each tile_n x steps; the kernel's tokens against XLA's in the same run (agreement, and
where they differ, how far apart the two tokens' float32 logits are: a near-tie decided
by the order of the sums). Rows as ratios to XLA's time.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench  # median time per call, as the kernel benchmark
from pallas_kernels import head_gpu


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", default="256,32,1")
  ap.add_argument("--d-model", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=130656)
  ap.add_argument("--vocab-padded", type=int, default=130688)
  ap.add_argument("--tiles", default="128x4,128x3", help="tile_n x pipeline steps")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--out", default=None)
  ap.add_argument("--interpret", action="store_true",
                  help="the kernel in the Pallas GPU interpreter (CPU: the test's small shapes)")
  args = ap.parse_args(argv)
  D, V, vocab = args.d_model, args.vocab_padded, args.vocab
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(D, V)) * 0.02, jnp.bfloat16)
  xla = jax.jit(lambda x, w: head_gpu.reference(x, w, vocab))
  rows = []
  print(f"{'batch':>6} {'head':<18} {'us':>9} {'x XLA':>7} {'agree':>7} {'max gap':>9}")
  for B in (int(b) for b in args.batches.split(",")):
    x = jnp.asarray(rng.normal(size=(B, D)), jnp.bfloat16)
    want_tok, _ = xla(x, w)
    logits = np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32))[:, :vocab]
    t_xla = bench(xla, x, w, reps=args.reps)
    rows.append({"batch": B, "head": "xla", "us": 1e6 * t_xla, "ratio_to_xla": 1.0})
    print(f"{B:>6} {'xla':<18} {1e6 * t_xla:>9.1f} {1.0:>7.2f}")
    for spec in args.tiles.split(","):
      tile_n, steps = (int(v) for v in spec.split("x"))
      name = f"kernel[{tile_n}x{steps}]"
      if head_gpu.unsupported_reason(B, D, V, x.dtype, tile_n=tile_n):
        continue
      fn = jax.jit(lambda x, w, tile_n=tile_n, steps=steps: head_gpu.greedy_head(
          x, w, vocab, tile_n=tile_n, steps=steps, interpret=args.interpret,
          num_ctas=4 if args.interpret else None))
      try:
        tok, _ = fn(x, w)
        t = bench(fn, x, w, reps=args.reps)
      except Exception as e:  # noqa: BLE001 - a failing tile is a row, not the end
        rows.append({"batch": B, "head": name, "error": repr(e)[:400]})
        print(f"{B:>6} {name:<18} error: {repr(e)[:200]}")
        continue
      tok, want = np.asarray(tok), np.asarray(want_tok)
      diff = np.flatnonzero(tok != want)
      gap = float(np.max(np.abs(logits[diff, tok[diff]] - logits[diff, want[diff]]))
                  if diff.size else 0.0)
      rows.append({"batch": B, "head": name, "tile_n": tile_n, "steps": steps,
                   "us": 1e6 * t, "ratio_to_xla": t / t_xla,
                   "token_agreement": float(np.mean(tok == want)), "max_logit_gap": gap})
      print(f"{B:>6} {name:<18} {1e6 * t:>9.1f} {t / t_xla:>7.2f} "
            f"{np.mean(tok == want):>7.3f} {gap:>9.2e}")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                 "d_model": D, "vocab": vocab, "vocab_padded": V, "reps": args.reps,
                 "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
