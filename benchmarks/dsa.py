"""DSA (issue 16) on one GPU: DeepSeek Sparse Attention (indexer + top-k selection + sparse
attention in latent form) vs dense causal cuDNN flash attention on the decompressed shapes,
forward and forward+backward, at 16k / 32k / 64k / 128k tokens (one sequence), MoHGE-3B
attention shapes (H = 16; dense: q/k 192 = 128 nope + 64 rope, v 128; latent: C = 512,
R = 64; top-k 2048; indexer 4 heads x 64).

    python -m benchmarks.dsa [--seqs 16384,32768,65536,131072] [--budget-s 330] [--out PATH]

Rows {seq, impl, pass, ms, tflops} (or {..., error} / {..., skipped}) go to
benchmarks/results/dsa_h200.json, rewritten after every row, and are printed as they come:
a failure or OOM in one row is recorded and the next row runs. impls:
  dense_cudnn          the model's dense MLA attention: attention.attend(impl="cudnn"), i.e.
                       jax.nn.dot_product_attention(implementation="cudnn"), causal, v
                       zero-padded to 192 (the FLOPs count 128)
  dsa_reference        select_topk + sparse_mla(impl="reference") (+ the indexer KL when
                       differentiated), pure JAX
  dsa_pallas           the same with sparse_mla(impl="pallas") (the forward kernel; its
                       backward is the reference's)
  dsa_pallas_radix     dsa_pallas with the top-k by `top_k_positions` (no sort)
  dsa_pallas_mma       dsa_pallas with the experimental 16-row MMA forward kernel
  topk_sort / topk_radix / topk_sample / topk_sample_search (its compaction by binary
                       searches, not a scatter) / topk_threshold: the indexer's scores and
                       the selection alone (forward), by jax.lax.top_k, top_k_positions,
                       top_k_sampled or top_k_threshold; topk_fused: `top_k_fused` (the
                       scores and candidates by a Triton kernel; options after the chunk,
                       topk_fused:<chunk>:cf4+d2+s4096+o1.5: cap_factor, digit_bits,
                       sample, oversample); "check_topk" rows say whether the others chose
                       sort's keys
  dsa_pallas_sample    dsa_pallas with the top-k by `top_k_sampled` (_threshold:
                       `top_k_threshold`, _fused: `top_k_fused`; so for every dsa_ row;
                       suffixes ":<scores>[:<bands>[:<chunk>[:<probs>]]]" set select_topk's
                       scores (auto, gather, dense, kernel), causal bands (default 4), query
                       chunk (default 256, model.dsa_query_chunk) and sparse_mla's KL
                       target (steps, the default: from the forward's steps; kernel: a
                       second pass),
                       e.g. dsa_pallas_mma_bwd_threshold:auto:1,
                       dsa_pallas_mma_bwd_threshold::4:1024 or
                       dsa_pallas_mma_bwd_fused::::kernel; topk_<method>:<chunk> too)
  dsa_pallas_mma_sample  both: the MMA kernel and the sampled top-k
  dsa_pallas_mma_bwd[_sample]: with the MMA kernel's backward kernel too
  sparse_mla_reference / sparse_mla_pallas / sparse_mla_pallas_mma / _pallas_mma_bwd:
                       the attention alone on a fixed selection
  kernel_{wg|cta}_tpc{1|3}: the forward kernel alone (forward pass only): halves of C by
                       two warpgroups sharing a gather or by two CTAs, 1 or 3 128-byte
                       column tiles per one-row TMA copy (576 or 192 copies per 64-key
                       step); sparse_mla_pallas / dsa_pallas use kernel_wg_tpc3
  kernel_mma           the experimental forward kernel on the 16-row MMA with a
                       warpgroup gather (pallas_kernels/sparse_mla_mma_gpu.py); at the
                       smallest length a "check_mma" row gives its error against
                       sparse_mla_reference (or kernel_wg_tpc3) when that ran before it
  kernel_mma_pad0 / _g8 / _g32: its SMEM rows unpadded (bank conflicts), 8 or 32 keys'
                       loads before their stores; kernel_mma_nogather / _nomma: the
                       kernel without the gather or without the products (wrong results:
                       how the time divides)
  kernel_bwd           the MMA backward kernel alone (given the forward's LSE, a random
                       cotangent and its delta), TMA reduce-adds; kernel_bwd_atomic: the
                       keys' gradients added by the warpgroup's atomics; either with
                       _no_reduce / _no_dk / _no_gather (nothing added; nor the keys'
                       gradients computed; no gather: how the time divides) or
                       _add_invalid (invalid keys' zero rows added to row 0, as before
                       the seventeenth session); _sorted: each query's keys in position
                       order (`top_k_threshold`'s), e.g. kernel_bwd_atomic_sorted (rows
                       _rot and _p<N> in the JSON are of variants since removed:
                       notes_dsa.md). A "check_bwd" row
                       gives each right variant's error against kernel_bwd. TFLOP/s:
                       2.5x the forward's (the backward's 5 products of the 7)
  selscores_kernel     the selected keys' index scores alone, forward+backward (the backward
                       adds the keys' gradients by float32 atomics), on the fixed selection:
                       _kernel (`indexer_gpu.selected_scores`, relaxed adds),
                       _kernel_ordered (its acquire-release adds, `plt.atomic_add`'s),
                       _gather (XLA: the rows gathered, a scatter-add); TFLOP/s: the
                       products J·K·I·2 a query, 3x for forward+backward
TFLOP/s counts useful FLOPs: dense H·T(T+1)/2·2·(192+128); sparse H·Σ_t min(t+1, k)·2·
(576+512); indexer T(T+1)/2·2·J·I; forward+backward = 3.5x forward for attention (the
backward recomputes the scores: 5 products vs 2) and 1x for the indexer (its backward only
reaches the k selected scores). At the smallest length it also records the kernel's forward
error against the reference (a "check" row).

Time: two rounds (the issue's comparison dense_cudnn / dsa_pallas_mma_bwd_fused (what
configs/mohge_3b_dsa.yaml runs) / dsa_reference_threshold over all lengths, then the
top-k, the selected scores and the attention alone), each in order of length; a
row starts only while the budget (default 330 s) is not
spent, and an (impl, pass) that failed or took over 20 s a call is not run at larger
lengths.
Expected on an H200: ~6 min (330 s + the last row; compiles ~5-20 s a row, the 128k rows
a few seconds a call), within a 10-minute command; the second round mostly does not fit
in the default budget: run it on its own with --impls (benchmarks/notes_dsa.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mohge_jax import sparse_attention as dsa
from mohge_jax.attention import attend
from pallas_kernels import sparse_mla_gpu, sparse_mla_mma_gpu

H, P, R, V, C = 16, 128, 64, 128, 512
J, I, TOPK, CHUNK = 4, 64, 2048, 256
SCALE = (P + R) ** -0.5
BWD_FACTOR = 3.5
BWD_WRONG = ("_no_reduce", "_no_dk", "_no_gather")  # kernel_bwd ablations: wrong results


def flops(seq: int, impl: str, pss: str) -> float:
  pairs_causal = seq * (seq + 1) / 2
  attn = indexer = 0.0
  if impl.startswith("topk_"):  # the indexer's scores and the selection
    return pairs_causal * 2 * J * I
  if impl.startswith("kernel_bwd"):
    return flops(seq, "kernel_mma", "fwd") * (BWD_FACTOR - 1)
  if impl.startswith("selscores"):
    return seq * TOPK * 2 * J * I * 3
  if impl == "dense_cudnn":
    attn = H * pairs_causal * 2 * (P + R + V)
  else:
    pairs = pairs_causal if seq <= TOPK else TOPK * seq - TOPK * (TOPK - 1) / 2
    attn = H * pairs * 2 * (C + R + C)
    if impl.startswith("dsa"):
      indexer = pairs_causal * 2 * J * I  # counted once in either pass
  return attn * (BWD_FACTOR if pss == "fwd_bwd" else 1.0) + indexer


def time_call(f, *args):
  """ms per call: one warm-up call (compiles), then 1 timed call when slow (> 0.3 s),
  else the median of 5 timings of up to 10 calls."""
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  once = time.perf_counter() - t0
  if once > 0.3:
    return once * 1e3, first
  n = max(1, min(10, int(0.1 / max(once, 1e-6))))
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(n):
      out = f(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / n)
  return float(np.median(ts)) * 1e3, first


def inputs(seq: int, seed: int = 0):
  keys = iter(jax.random.split(jax.random.key(seed), 16))
  bf = lambda *s, sd=1.0: (sd * jax.random.normal(next(keys), s, jnp.float32)  # noqa: E731
                           ).astype(jnp.bfloat16)
  return dict(
      q=bf(1, seq, H, P + R), k=bf(1, seq, H, P + R), v=bf(1, seq, H, V),
      o_ct=bf(1, seq, H, V),
      q_lat=bf(1, seq, H, C, sd=C ** -0.5), q_rope=bf(1, seq, H, R), c=bf(1, seq, C),
      kr=bf(1, seq, R), lat_ct=bf(1, seq, H, C),
      q_I=bf(1, seq, J, I), w_I=bf(1, seq, J), k_I=bf(1, seq, I))


def dense_fn(pss):
  def fwd(q, k, v):  # the model's dense MLA path: v zero-padded to 192 for cuDNN
    return attend(q, k, v, scale=SCALE, segment_ids_BxL=None, impl="cudnn")
  if pss == "fwd":
    return jax.jit(fwd), ("q", "k", "v")

  def fb(ct, q, k, v):
    o, vjp = jax.vjp(fwd, q, k, v)
    return o, vjp(ct)
  return jax.jit(fb), ("o_ct", "q", "k", "v")


def dsa_fn(pss, impl, method="sort"):
  # <method>[:<scores>[:<bands>[:<chunk>[:<probs>]]]]: select_topk's scores (auto, gather,
  # dense, kernel), bands, the query chunk (model.dsa_query_chunk; CHUNK when empty) and
  # sparse_mla's _probs (steps, kernel), e.g. dsa_pallas_mma_bwd_fused::::kernel
  method, scores, bands, chunk, probs = (method.split(":") + [""] * 4)[:5]
  chunk = int(chunk or CHUNK)

  def fwd(q_lat, q_rope, c, kr, q_I, w_I, k_I):
    idx, valid, score = dsa.select_topk(q_I, w_I, k_I, topk=TOPK, chunk=chunk, method=method,
                                        scores=scores or "auto", bands=int(bands or 4))
    o, p = dsa.sparse_mla(q_lat, q_rope, c, kr, idx, valid, scale=SCALE, chunk=chunk,
                          impl=impl, _probs=probs or "steps")
    return o, jnp.mean(dsa.sparse_indexer_kl(p, score, valid))
  names = ("q_lat", "q_rope", "c", "kr", "q_I", "w_I", "k_I")
  if pss == "fwd":
    return jax.jit(fwd), names

  def fb(ct, *args):
    (o, kl), vjp = jax.vjp(fwd, *args)
    return o, vjp((ct, jnp.ones_like(kl)))
  return jax.jit(fb), ("lat_ct",) + names


FUSED_OPTIONS = {"cf": ("cap_factor", int), "d": ("digit_bits", int), "s": ("sample", int),
                 "o": ("oversample", float)}


def topk_fn(method):
  """The indexer's scores and the top-k selection alone (forward: positions only);
  method "sample_search": the sampled top-k with the searched compaction; a suffix
  ":<chunk>" sets the query chunk (CHUNK when absent), e.g. threshold:1024; for "fused"
  (whose chunk is at least dsa.FUSED_CHUNK) a further ":<options>" sets top_k_fused's
  cap_factor, digit_bits, sample, oversample, e.g. fused::cf4+d2 or fused:4096:s4096."""
  method, _, rest = method.partition(":")
  chunk, _, opts = rest.partition(":")
  method, _, compact = method.partition("_")
  chunk = int(chunk or CHUNK)
  fused_options = {}
  for opt in filter(None, opts.split("+")):
    key = next((k for k in sorted(FUSED_OPTIONS, key=len, reverse=True) if opt.startswith(k)),
               None)
    if key is None:
      raise ValueError(f"top-k option {opt!r}: must start with one of {list(FUSED_OPTIONS)}")
    name, cast = FUSED_OPTIONS[key]
    fused_options[name] = cast(opt[len(key):])
  return jax.jit(lambda a, b, c: dsa.select_topk(
      a, b, c, topk=TOPK, chunk=chunk, method=method, _compact=compact or "scatter",
      fused_options=fused_options or None)[:2]), ("q_I", "w_I", "k_I")


def selscores_fn(name, idx):
  """The selected keys' scores, forward+backward, on the fixed selection idx."""
  from pallas_kernels import indexer_gpu
  mode = name.removeprefix("selscores_")

  def scores(q_I, w_I, k_I, idx):
    if mode == "gather":
      return indexer_gpu.selected_scores_reference(q_I, w_I, k_I, idx)
    return indexer_gpu.selected_scores(q_I, w_I, k_I, idx,
                                       _ordered_adds=mode == "kernel_ordered")

  def fb(q_I, w_I, k_I, idx):
    s, vjp = jax.vjp(lambda *a: scores(*a, idx), q_I, w_I, k_I)
    return s, vjp(jnp.ones_like(s) / s.size)
  f = jax.jit(fb)
  return (lambda *x: f(*x, idx)), ("q_I", "w_I", "k_I")


def sparse_mla_fn(pss, impl, idx, valid):
  # the selection an argument of the jitted function, not a constant (slow to compile); in
  # the backward not differentiated
  def fwd(q_lat, q_rope, c, kr, idx, valid):
    return dsa.sparse_mla(q_lat, q_rope, c, kr, idx, valid, scale=SCALE, chunk=CHUNK,
                          impl=impl)[0]
  names = ("q_lat", "q_rope", "c", "kr")
  if pss == "fwd":
    f = jax.jit(fwd)
    return (lambda *x: f(*x, idx, valid)), names

  def fb(ct, *args):
    o, vjp = jax.vjp(lambda *a: fwd(*a, *args[4:]), *args[:4])
    return o, vjp(ct)
  f = jax.jit(fb)
  return (lambda *x: f(*x, idx, valid)), ("lat_ct",) + names


def kernel_fn(name, idx, valid):
  """The forward kernel alone (o_lat and LSE): name = kernel_{wg|cta}_tpc{1|3} or
  kernel_mma."""
  idx_enc = jnp.where(valid, idx, -1)
  if name.startswith("kernel_mma"):  # kernel_mma[_pad0|_g8|_g32|_nogather|_nomma]
    kw = {"": {}, "_pad0": dict(row_pad=0), "_g8": dict(group=8), "_g32": dict(group=32),
          "_nogather": dict(_ablate="no_gather"), "_nomma": dict(_ablate="no_mma")}[
              name.removeprefix("kernel_mma")]
    mma = jax.jit(lambda q_lat, q_rope, c, kr, idx_enc: sparse_mla_mma_gpu.sparse_mla_fwd(
        q_lat, q_rope, jnp.concatenate([c, kr], -1), idx_enc, scale=SCALE, **kw))
    return (lambda *x: mma(*x, idx_enc)), ("q_lat", "q_rope", "c", "kr")
  split, tpc = name.split("_")[1:]

  def fwd(q_lat, q_rope, c, kr, idx_enc):
    ckr = jnp.concatenate([c, kr], -1)
    return sparse_mla_gpu.sparse_mla_fwd(
        q_lat, q_rope, ckr, idx_enc, scale=SCALE, tiles_per_copy=int(tpc.removeprefix("tpc")),
        split={"wg": "warpgroup", "cta": "cta"}[split])
  fwd = jax.jit(fwd)
  return (lambda *x: fwd(*x, idx_enc)), ("q_lat", "q_rope", "c", "kr")


def kernel_bwd_fn(name, idx, valid):
  """The backward kernel alone: name = kernel_bwd[_atomic][_sorted][_no_reduce|_no_dk|
  _no_gather|_add_invalid] (_atomic: reduce="atomic", else "tma"; _sorted: each query's
  keys in position order, as `top_k_threshold` gives them, instead of `lax.top_k`'s score
  order)."""
  idx_enc = jnp.where(valid, idx, -1)
  rest = name.removeprefix("kernel_bwd")
  flags = {}
  for flag in ("_atomic", "_sorted"):
    flags[flag] = rest.startswith(flag)
    rest = rest.removeprefix(flag)
  reduce = "atomic" if flags["_atomic"] else "tma"
  ablate = rest.removeprefix("_")
  if flags["_sorted"]:  # the invalid (-1) first, as they would sort
    idx_enc = jnp.sort(idx_enc, axis=-1)

  def fwd_then_bwd_inputs(q_lat, q_rope, c, kr, lat_ct, idx_enc):
    ckr = jnp.concatenate([c, kr], -1)
    o, lse = sparse_mla_mma_gpu.sparse_mla_fwd(q_lat, q_rope, ckr, idx_enc, scale=SCALE)
    delta = jnp.sum(lat_ct.astype(jnp.float32) * o.astype(jnp.float32), -1)
    return ckr, lse, delta
  prep = jax.jit(fwd_then_bwd_inputs)
  # idx an argument, not a closed-over constant: as a constant (512 MB at 64k) it took a
  # minute to compile (first_call_s 75 s at 64k in the twenty-first session's call 1)
  bwd = jax.jit(lambda q_lat, q_rope, ckr, lse, g, delta, idx_enc:
                sparse_mla_mma_gpu.sparse_mla_bwd(
                    q_lat, q_rope, ckr, idx_enc, lse, g, delta, scale=SCALE, reduce=reduce,
                    _ablate=ablate))
  cache = {}

  def f(q_lat, q_rope, c, kr, lat_ct):  # the forward's outputs made once, then the backward
    if not cache:
      cache["in"] = jax.block_until_ready(prep(q_lat, q_rope, c, kr, lat_ct, idx_enc))
    ckr, lse, delta = cache["in"]
    return bwd(q_lat, q_rope, ckr, lse, lat_ct, delta, idx_enc)
  return f, ("q_lat", "q_rope", "c", "kr", "lat_ct")


def profile(f, args, logdir: str, name: str) -> list[dict]:
  """One traced call of f: its top 15 device operations by kernel name and by source (the
  JAX name stack, from the compiled HLO's op_name metadata: the GPU's events lack it),
  printed, and returned as rows {by, name, category, count, ms, share}."""
  from benchmarks import profile_summary as ps
  trace = ps.load_trace(ps.capture(f, *args, logdir=os.path.join(logdir, name), warmup=0,
                                   steps=1))
  tot = ps.totals(trace, steps=1)
  hlo = (ps.hlo_op_names(f.lower(*args).compile().as_text()) if hasattr(f, "lower")
         else None)  # the rows whose jitted function takes the selection too: no names
  out = []
  for by in ("name", "source"):
    rows = ps.summarise(trace, 15, by, hlo=hlo)
    print(f"  profile {name} by {by}:\n" + ps.format_table(rows, tot), flush=True)
    out += [{"by": by, "name": r["name"], "category": r["category"], "count": r["count"],
             "ms": r["total_ms"], "share": r["share"]} for r in rows]
  return out


# Two rounds over the lengths: the comparison first, then the attention alone.
# The first: the comparison with the 3B DSA config's path (the MMA kernels forward
# and backward, the fused top-k, the selected scores' kernel) and the pure-JAX one; the
# second: its parts alone.
ROUNDS = (("dense_cudnn", "dsa_pallas_mma_bwd_fused", "dsa_reference_threshold"),
          ("topk_threshold", "topk_fused", "selscores_kernel", "sparse_mla_pallas_mma_bwd",
           "kernel_mma", "kernel_bwd_atomic_sorted"))


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seqs", default="16384,32768,65536,131072")
  ap.add_argument("--impls", default=None, help="comma-separated subset (default: all, in "
                  "two rounds over the lengths: " + "; ".join(",".join(r) for r in ROUNDS) + ")")
  ap.add_argument("--budget-s", type=float, default=330.0)
  ap.add_argument("--passes", default="fwd,fwd_bwd",
                  help="of the rows with both, the passes to time (e.g. fwd_bwd alone)")
  ap.add_argument("--profile", default=None, metavar="DIR",
                  help="after timing each row of --profile-impls, trace one call into DIR and "
                  "print its top device operations by kernel and by source (the DSA code's "
                  "named scopes: dsa_topk, dsa_selected_scores, dsa_sparse_mla, "
                  "dsa_indexer_kl); the row keeps them as profile_top_ops")
  ap.add_argument("--profile-impls", default="dsa_pallas_mma_bwd_sample")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "dsa_h200.json"))
  args = ap.parse_args()
  start = time.perf_counter()
  dev = jax.devices()[0]
  print("jax", jax.__version__, dev, flush=True)
  result = dict(device=getattr(dev, "device_kind", str(dev)), jax_version=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(), rows=[])

  def record(row):
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
      json.dump(result, fh, indent=1)

  given_up = set()
  seqs = [int(s) for s in args.seqs.split(",")]
  rounds = ROUNDS if args.impls is None else (tuple(args.impls.split(",")),)
  for impls in rounds:
    for seq in seqs:
      data = {}  # made at the first row that runs: the inputs, a fixed top-k selection

      def get(seq=seq, data=data):
        if not data:
          data["x"] = x = inputs(seq)
          data["sel"] = jax.jit(lambda a, b, c: dsa.select_topk(
              a, b, c, topk=TOPK, chunk=CHUNK)[:2])(x["q_I"], x["w_I"], x["k_I"])
        return data["x"], data["sel"]
      outs = {}
      for impl in impls:
        for pss in (("bwd",) if impl.startswith("kernel_bwd") else ("fwd_bwd",)
                    if impl.startswith("selscores") else ("fwd",)
                    if impl.startswith(("kernel", "topk")) else
                    tuple(p for p in ("fwd", "fwd_bwd") if p in args.passes.split(","))):
          row = dict(seq=seq, impl=impl, **{"pass": pss})
          if (impl, pss) in given_up:
            record(dict(row, skipped="failed or too slow at a shorter length"))
            continue
          if time.perf_counter() - start > args.budget_s:
            record(dict(row, skipped="time budget spent"))
            continue
          try:
            x, sel = get()
            if impl == "dense_cudnn":
              f, names = dense_fn(pss)
            elif impl.startswith("selscores_"):
              f, names = selscores_fn(impl, sel[0])
            elif impl.startswith("kernel_bwd"):
              f, names = kernel_bwd_fn(impl, *sel)
            elif impl.startswith("kernel_"):
              f, names = kernel_fn(impl, *sel)
            elif impl.startswith("topk_"):
              f, names = topk_fn(impl.removeprefix("topk_"))
            elif impl.startswith("dsa_"):
              rest = impl.removeprefix("dsa_")  # dsa_<impl>[_<top-k method>]
              kind = next(k for k in ("pallas_mma_bwd", "pallas_mma", "pallas", "reference")
                          if rest == k or rest.startswith(k + "_"))
              f, names = dsa_fn(pss, kind, rest[len(kind) + 1:] or "sort")
            else:
              f, names = sparse_mla_fn(pss, impl.removeprefix("sparse_mla_"), *sel)
            ms, first = time_call(f, *(x[n] for n in names))
            top = (profile(f, [x[n] for n in names], args.profile, f"{impl}_{pss}_{seq}")
                   if args.profile and impl in args.profile_impls.split(",") else None)
            record(dict(row, ms=round(ms, 3),
                        tflops=round(flops(seq, impl, pss) / ms / 1e9, 1),
                        first_call_s=round(first, 1),
                        **({"profile_top_ops": top} if top else {})))
            if ms > 20e3:
              given_up.add((impl, pss))
            if seq == seqs[0] and impl.startswith("sparse_mla") and pss == "fwd":
              outs[impl] = np.asarray(f(*(x[n] for n in names)), np.float32)
            if seq == seqs[0] and impl in ("kernel_mma", "kernel_wg_tpc3"):
              outs[impl] = np.asarray(f(*(x[n] for n in names))[0], np.float32)
            if seq == seqs[0] and impl.startswith("kernel_bwd") and not impl.endswith(
                BWD_WRONG):  # the variants with right results, checked below
              outs[impl] = [np.asarray(a, np.float32) for a in f(*(x[n] for n in names))]
            if seq == seqs[0] and impl.startswith("topk_"):  # each query's set of keys
              idx, valid = (np.asarray(a) for a in f(*(x[n] for n in names)))
              outs[impl] = np.sort(np.where(valid, idx, -1), axis=-1)
          except Exception as e:  # noqa: BLE001 -- recorded; the next row runs
            record(dict(row, error=f"{type(e).__name__}: {str(e)[:400]}"))
            given_up.add((impl, pss))
      others = ([k for k in outs if k.startswith("topk_") and k != "topk_sort"]
                if "topk_sort" in outs else [])
      for other in others:  # each method's (and chunk's) keys against lax.top_k's
        record(dict(seq=seq, impl="check_topk", **{"pass": "fwd"}, method=other,
                    equals_sort=bool((outs[other] == outs["topk_sort"]).all()),
                    queries_differing=int((outs[other] != outs["topk_sort"]).any(-1).sum())))
      base = next((k for k in ("sparse_mla_reference", "kernel_wg_tpc3") if k in outs), None)
      if "kernel_mma" in outs and base:
        a, b = outs["kernel_mma"], outs[base]
        record(dict(seq=seq, impl="check_mma", **{"pass": "fwd"}, against=base,
                    rel_err=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                    finite=bool(np.isfinite(a).all())))
      others = [k for k in outs if k.startswith("kernel_bwd_")] if "kernel_bwd" in outs else []
      for other in others:  # each right variant against kernel_bwd
        record(dict(seq=seq, impl="check_bwd", variant=other, **{"pass": "bwd"},
                    rel_err=[float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(
                        outs[other], outs["kernel_bwd"])],
                    finite=bool(all(np.isfinite(a).all() for a in outs[other]))))
      if "sparse_mla_pallas" in outs and "sparse_mla_reference" in outs:
        a, b = outs["sparse_mla_pallas"], outs["sparse_mla_reference"]
        record(dict(seq=seq, impl="check", **{"pass": "fwd"},
                    pallas_vs_reference_rel_err=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                    pallas_finite=bool(np.isfinite(a).all())))
      del data, outs
  print(f"done in {time.perf_counter() - start:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
  main()
