"""How much consecutive queries' DSA selections share (issue 16: whether the backward
kernel's adds into the keys' gradients could be merged across a group of queries).

    python -m benchmarks.dsa_overlap [--seq 16384] [--topk 2048] [--out PATH]

The selection is benchmarks/dsa.py's own (its random inputs, `select_topk`, top-2048). For
groups of n = 2, 4, 8, 16 consecutive queries (200 groups drawn past the first top-k
queries): the size of the union of their selected keys over one query's set (n when they
share nothing, 1 when they share all), median and mean; and how many queries choose each
key (quantiles). Runs on CPU (~30 s at 16k); prints a table and writes JSON.

    python -m benchmarks.dsa_overlap --workdir RUN [--batches 2] [--rows 16] [--out PATH]

The same ratios for a trained model's indexer (a DSA training workdir, e.g. a dense
warm-up's, or an export): validation windows of the run's data through the model, layer by
layer; at each layer the top-k (`model.dsa_topk`, by `select_topk`) of the trained indexer
and, on the same hidden states, of a freshly initialised one. The random inputs above stand
for an untrained indexer; whether a trained one's neighbouring queries share more keys
decides whether a kernel over groups of queries and the union of their keys pays
(benchmarks/notes_dsa.md, nineteenth session). Groups start past the first top-k + n
queries (every query of a group with all k keys valid).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import dsa as bench
from mohge_jax import sparse_attention as dsa


NS = (2, 4, 8, 16)


def union_ratios(idx_TxK: np.ndarray, valid_TxK: np.ndarray, starts, n: int) -> np.ndarray:
  """For each start t: |union of the selected keys of queries t..t+n-1| / their mean set
  size (n when they share nothing, 1 when all the same)."""
  out = []
  for start in starts:
    sets = [set(idx_TxK[t][valid_TxK[t]].tolist()) for t in range(start, start + n)]
    out.append(len(set().union(*sets)) / np.mean([len(s) for s in sets]))
  return np.asarray(out)


def layer_selections(model, tokens_BxT: jax.Array, indexers=None):
  """Per MLA layer of `model` (a DSA Transformer, its layers run one by one on the
  tokens' hidden states): (idx [B, T, K], valid) of `select_topk` over that layer's
  indexer outputs, or over `indexers[i]`'s (another indexer of the same shapes) on the
  same hidden states. Returns (that list, the last layer's output [B, T, D])."""
  m = model.cfg.model
  B, T = tokens_BxT.shape
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

  @nnx.jit
  def layer(block, indexer, x):  # one compilation a kind of layer
    h = block.attn_norm(x)
    q_I, w_I, k_I = indexer(h, block.attn.query_latent(h), pos)
    idx, valid = dsa.select_topk(q_I, w_I, k_I, topk=m.dsa_topk, chunk=m.dsa_query_chunk,
                                 method=m.dsa_topk_method)[:2]
    return idx, valid, block(x, pos, None)[0]

  x = jnp.take(model.embed[...], tokens_BxT, axis=0).astype(model.dtype)
  out, i = [], 0
  for stack in model.stacks:
    graphdef, state = nnx.graphdef(stack.layers), nnx.state(stack.layers)
    for j in range(stack.num):
      block = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state))
      idx, valid, x = layer(block, block.attn.indexer if indexers is None else indexers[i], x)
      out.append((np.asarray(idx), np.asarray(valid)))
      i += 1
  return out, x


def trained(workdir: str, batches: int, rows: int, out: str) -> None:
  """The --workdir mode (module docstring)."""
  from mohge_jax import data
  from mohge_jax.generate import load_model
  model, cfg = load_model(workdir)
  m, t = cfg.model, cfg.train
  if m.sparse_attention != "dsa":
    raise SystemExit(f"{workdir}: model.sparse_attention is {m.sparse_attention!r}, not dsa")
  K = m.dsa_topk
  if t.seq_len <= K + max(NS):
    raise SystemExit(f"train.seq_len {t.seq_len} must exceed dsa_topk + {max(NS)}")
  prepared = data.prepare(cfg.data.source, cfg.data.tokenizer,
                          val_permille=cfg.data.val_permille,
                          cache_dir=cfg.data.cache_dir or None,
                          eos_token=cfg.data.eos_token or None)
  fresh = [dsa.Indexer(m, rngs=nnx.Rngs(12345 + i)) for i in range(m.num_layers)]
  ratios = {}  # (source, layer, n) -> ratios
  starts = np.arange(K, t.seq_len - max(NS))
  for b, batch in enumerate(data.eval_batches(prepared.val_tokens, seq_len=t.seq_len,
                                              batch=rows,
                                              eos_id=prepared.tokenizer.eos_id,
                                              max_batches=batches)):
    tokens = jnp.asarray(batch["inputs"])
    real_B = np.asarray(batch["loss_mask"]).any(-1)  # False: a padding row
    for source, sel in (("trained", layer_selections(model, tokens)[0]),
                        ("fresh", layer_selections(model, tokens, fresh)[0])):
      for layer, (idx, valid) in enumerate(sel):
        for r in range(idx.shape[0]):
          if not real_B[r]:
            continue
          for n in NS:
            ratios.setdefault((source, layer, n), []).append(
                union_ratios(idx[r], valid[r], starts, n))
    print(f"batch {b + 1} done", flush=True)
  result = []
  print("| indexer | layer | queries n | union / one set, median | mean |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for (source, layer, n), rs in sorted(ratios.items()):
    rs = np.concatenate(rs)
    result.append(dict(indexer=source, layer=layer, n=n,
                       union_over_one_median=float(np.median(rs)),
                       union_over_one_mean=float(np.mean(rs)), groups=int(rs.size)))
    print(f"| {source} | {layer} | {n} | {np.median(rs):.2f} | {np.mean(rs):.2f} |")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as fh:
    json.dump(dict(workdir=str(workdir), seq=t.seq_len, topk=K, batches=batches,
                   windows_a_batch=rows, rows=result), fh, indent=1)
  print(f"wrote {out}")


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seq", type=int, default=16384)
  ap.add_argument("--topk", type=int, default=bench.TOPK)
  ap.add_argument("--groups", type=int, default=200)
  ap.add_argument("--workdir", default=None, help="a DSA training workdir or export")
  ap.add_argument("--batches", type=int, default=2, help="--workdir: validation batches")
  ap.add_argument("--rows", type=int, default=16, help="--workdir: windows a batch")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  if args.workdir:
    trained(args.workdir, args.batches, args.rows, args.out or os.path.join(
        os.path.dirname(__file__), "results", "dsa_overlap_trained.json"))
    return
  args.out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                      "dsa_overlap.json")
  if args.seq <= args.topk + 16:
    raise SystemExit(f"--seq must exceed top-k + 16 = {args.topk + 16}, got {args.seq}")
  x = bench.inputs(args.seq)
  t0 = time.perf_counter()
  idx, valid = jax.jit(lambda a, b, c: dsa.select_topk(
      a, b, c, topk=args.topk, chunk=min(bench.CHUNK, args.topk))[:2])(x["q_I"], x["w_I"], x["k_I"])
  idx, valid = np.asarray(idx[0]), np.asarray(valid[0])
  print(f"selected {idx.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  print("| queries n | union / one set, median | mean | sharing nothing |")
  print("| ---: | ---: | ---: | ---: |")
  for n in NS:
    ratios = union_ratios(idx, valid, rng.integers(args.topk, args.seq - n, size=args.groups),
                          n)
    rows.append(dict(n=n, union_over_one_median=float(np.median(ratios)),
                     union_over_one_mean=float(np.mean(ratios))))
    print(f"| {n} | {np.median(ratios):.2f} | {np.mean(ratios):.2f} | {n} |")
  counts = np.bincount(idx[valid].ravel(), minlength=args.seq)
  qs = (0.5, 0.9, 0.99, 1.0)
  chosen_by = {str(q): float(v) for q, v in zip(qs, np.quantile(counts, qs))}
  print("queries choosing a key, quantiles:", chosen_by)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(dict(seq=args.seq, topk=args.topk, groups=args.groups, rows=rows,
                   queries_choosing_a_key=chosen_by), fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
