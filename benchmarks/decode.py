"""Decode throughput against the memory-bandwidth limit (issue 15).

    python -m benchmarks.decode [--configs configs/mohge_3b.yaml,configs/moe_3b.yaml]
        [--batches 256,32,1] [--prompt-len 512] [--new-tokens 128] [--reps 3]
        [--decode-backends auto,model,all_experts,capacity,capacity_kernel]
        [--layouts scan,unrolled] [--decode-options generate,xla]
        [--profile DIR] [--profile-batches 256,1] [--out benchmarks/results/decode_h200.json]
        [--dry-run] [key=value ...]

Random-initialised weights stored in bf16 (what a bf16 export serves; routing of random
weights is not a trained model's), random prompts of exactly --prompt-len tokens per row.
Per (config, batch): the prompt's prefill (`generate.prefill`, timed apart), then
--new-tokens decode steps (`generate.decode_step`, greedy: the loop `generate` runs at
temperature 0, the token from its greedy head) as one jitted `lax.scan`, once per decode
expert backend
(the names `generate --decode-backend` takes: `auto`, generate's default, capacity
from 8 routed rows per expert else all_experts (`generate.decode_expert_backend`); `model`:
model.expert_backend, the Mosaic GPU kernels on the H200; `all_experts`:
`dispatch.all_experts`; `capacity`: `dispatch.capacity_experts`; `capacity_kernel`: the
same through the Mosaic GPU kernels, unrolled only; NAME[key=value+...] adds a tuning of
those kernels, e.g. `capacity_kernel[kernel=hgmm+bk=64]`, or absorb=FORM the attention's
decode weights (`MLA.decode_weights(absorb=)`; else model.decode_absorb), e.g.
`auto[absorb=query]`, or unroll=N decode steps a loop iteration (else generate's, `generate.decode_unroll`),
e.g. `auto[unroll=4]`, or head=auto|kernel|xla the greedy token's output layer (else
generate's, `generate.GREEDY_HEAD`; `generate.greedy_tokens`), e.g. `auto[head=xla]`)
and layer layout (`--layouts`:
the layer scan, or unrolled over separate per-layer buffers), run --reps times from the
same prefilled cache after a warm-up run; step time = median over runs of run time / new
tokens, tokens/s = batch / step time.
compile_s: lower + compile of the decode loop (prefill's apart, in prefill_compile_s);
each batch is a new program (its shapes), so it compiles again. Each config runs in its
own process (its batches in it, one after the other: a failing batch reports an error row
and the next one runs); rows are written to --out as they come, so a run cut short keeps
what it measured.

Bandwidth limit per step = the bytes a decode step must read / 4.8 TB/s (the H200's HBM):
  weights, bf16: every parameter but the embedding table and the routed experts, once;
    one embedding row per batch row; per routed layer the distinct experts the step's
    tokens hit, 3 * d * W_g each (counted from the routes the run recorded);
  KV cache, bf16: per layer and row, kv_lora_rank + qk_rope_head_dim numbers for each
    position the row attends to (0..its position: the current lengths).
fraction_of_bandwidth = limit / measured step time. (This decode step attends over all
S = prompt + new slots of the cache, masked, so it reads more than the limit counts.)
--dry-run prints the same arithmetic with the expected number of distinct experts under
uniform routing, E * (1 - (1 - K/E)^B) per layer (a token's K experts hit a given one
with probability K/E, in MoHGE too: P(its group) * P(it | group) = Kg/G * K/(Kg*N); the
groups' widths weight the bytes), and the memory of weights and cache; no device needed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mohge_jax import dispatch
from mohge_jax import generate as gen
from mohge_jax import params as params_lib
from mohge_jax.config import Config, load_config
from mohge_jax.model import Transformer
from mohge_jax.trainer import graph_def

HBM_BYTES_PER_S = 4.8e12  # H200, datasheet
BYTES = 2  # bf16 weights and cache
# --decode-options: the decode program's compiler options. "generate": what
# `generate.generate` compiles its decode loop with (`generate.decode_compiler_options`);
# "xla": XLA's defaults.
DECODE_OPTIONS = {"generate": gen.decode_compiler_options, "xla": dict}


# ----------------------------------------------------------------------------- bytes


def expert_bytes_E(cfg: Config) -> np.ndarray:
  """Bytes of each routed expert (gate, up, down) in global order: [E]."""
  m = cfg.model
  return np.repeat(3 * m.d_model * np.asarray(m.group_widths, np.float64) * BYTES,
                   m.experts_per_group)


def routed_layers(cfg: Config) -> int:
  return sum(k != "dense" for k in cfg.model.ffn_kinds)


def fixed_weight_bytes(cfg: Config, batch: int) -> float:
  """Weights every decode step reads whatever the routing: all but the embedding table and
  the routed experts, and one embedding row per batch row."""
  c = params_lib.count(cfg)["breakdown"]
  rest = sum(c.values()) - c["routed_experts"] - c["embedding"]
  return BYTES * (rest + batch * cfg.model.d_model)


def cache_bytes_per_position(cfg: Config) -> float:
  """One position's cache entry summed over the layers (MLA: latent and rope key; with DSA
  also the indexer's key, all of which a decode step reads to select; of the latents it
  then reads only the top-k, which this count does not model)."""
  m = cfg.model
  index = m.dsa_index_dim if m.sparse_attention == "dsa" else 0
  return BYTES * m.num_layers * (m.kv_lora_rank + m.qk_rope_head_dim + index)


def step_bytes(cfg: Config, positions_B: np.ndarray, expert_ids_RxBxK: np.ndarray | None
               ) -> dict[str, float]:
  """Bytes one decode step must read: rows at `positions_B` (attending to 0..position),
  the experts in `expert_ids_RxBxK` (the step's routes; None: the expected count under
  uniform routing)."""
  m = cfg.model
  B = len(positions_B)
  bytes_E = expert_bytes_E(cfg)
  if expert_ids_RxBxK is None:
    hit = 1 - (1 - m.top_k / m.num_experts) ** B
    expert = routed_layers(cfg) * hit * bytes_E.sum()
  else:
    R = expert_ids_RxBxK.shape[0]
    hit_RxE = np.zeros((R, m.num_experts), bool)
    hit_RxE[np.arange(R)[:, None], expert_ids_RxBxK.reshape(R, -1)] = True
    expert = float((hit_RxE * bytes_E).sum())
  fixed = fixed_weight_bytes(cfg, B)
  cache = cache_bytes_per_position(cfg) * float(np.sum(np.asarray(positions_B) + 1))
  return {"fixed_weights": fixed, "experts": expert, "cache": cache,
          "total": fixed + expert + cache}


# ----------------------------------------------------------------------------- measurement


def init_bf16(cfg: Config, seed: int = 0):
  """(graphdef, state): a random model with every parameter stored in bf16."""
  make = lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))  # noqa: E731
  state = jax.jit(lambda: jax.tree.map(lambda a: a.astype(jnp.bfloat16), make()))()
  return graph_def(cfg), state


def make_prefill(cfg: Config, graphdef, cache_len: int):
  """(state, prompts_BxP, lengths_B) -> (greedy first token [B], caches)."""
  def prefill(state, prompts_BxP, lengths_B):
    logits_BxV, caches, _ = gen.prefill(nnx.merge(graphdef, state), prompts_BxP, lengths_B,
                                        cache_len)
    return _greedy(cfg, logits_BxV), caches
  return prefill


def _backend_name(m, backend: str | None, batch: int) -> str:
  """What a decode backend ran as: None -> model.expert_backend resolved, "auto" -> the
  choice `generate` makes for `batch` one-token rows ("auto: capacity")."""
  if backend is None:
    return dispatch.resolve_backend(m.expert_backend, m.group_widths, m.d_model)
  if backend == "auto":
    return f"auto: {gen.decode_expert_backend(m, batch)}"
  return backend


def make_decode(cfg: Config, graphdef, new_tokens: int, expert_backend: str | None = None,
                unroll: int | None = None, head: str | None = None):
  """(state, layers, tokens_B, positions_B, caches) -> (tokens [N, B], expert ids
  [N, R, B, K]): `new_tokens` greedy decode steps in one `lax.scan` (`unroll` steps a loop
  iteration; None: generate's, `generate.decode_unroll`), each feeding the token it drew;
  routed experts through `expert_backend` (`generate.decode_step`), the token from the
  output layer `head` (`generate.greedy_tokens`; None: generate's, `GREEDY_HEAD`).
  `layers`: None (the layer scan over the stacked weights and caches) or
  `generate.unstack_layers`'s separate per-layer buffers, run unrolled, with `caches` from
  `generate.unstack_caches`."""
  def decode(state, layers, tokens_B, positions_B, caches):
    model = nnx.merge(graphdef, state)

    def step(carry, _):
      tokens_B, positions_B, caches = carry
      next_B, caches, routes = gen.decode_step(model, tokens_B, positions_B, caches,
                                               expert_backend, layers=layers,
                                               greedy=head or gen.GREEDY_HEAD)
      ids = [r.expert_ids[:, :, 0] for r in routes if r is not None]
      ids_RxBxK = (jnp.concatenate(ids) if ids
                   else jnp.zeros((0, tokens_B.shape[0], cfg.model.top_k), jnp.int32))
      return (next_B, positions_B + 1, caches), (next_B, ids_RxBxK)

    _, out = jax.lax.scan(step, (tokens_B, positions_B, caches), None, length=new_tokens,
                          unroll=gen.decode_unroll() if unroll is None else unroll)
    return out
  return decode


def parse_tuning(text: str) -> dict:
  """'kernel=hgmm+bk=64' -> {'kernel': 'hgmm', 'bk': 64}: the decode kernels' tuning
  (`dispatch.stack_experts`), as the benchmarks take it on the command line."""
  pairs = [kv.split("=", 1) for kv in text.split("+")]
  if any(len(p) != 2 or not p[0] for p in pairs):
    raise ValueError(f"kernel tuning {text!r}: expected key=value joined by '+'")
  return {k: int(v) if v.isdigit() else v for k, v in pairs}


def _backend_and_tuning(label: str | None) -> tuple[str | None, dict | None]:
  """'capacity_kernel[kernel=hgmm+bk=64]' -> ('capacity_kernel', {'kernel': 'hgmm', 'bk':
  64}): a backend and the decode kernels' tuning (`parse_tuning`)."""
  if label is None or "[" not in label:
    return label, None
  name, rest = label.split("[", 1)
  if not rest.endswith("]"):
    raise ValueError(f"decode backend {label!r}: expected name[key=value+...]")
  return name, parse_tuning(rest[:-1])


def _greedy(cfg: Config, logits_BxV: jax.Array) -> jax.Array:
  return jnp.argmax(logits_BxV[:, :cfg.model.vocab_size], -1).astype(jnp.int32)


def run(cfg: Config, graphdef, state, batch: int, prompt_len: int, new_tokens: int, reps: int,
        backends: tuple[str | None, ...] = (None,), seed: int = 0,
        layouts: tuple[str, ...] = ("scan",), profile: str | None = None,
        profile_top: int = 15, decode_options: tuple[str, ...] = ("generate",)):
  """One (config, batch): the prompt's prefill, then per layer layout ("scan": the layer
  scan over stacked weights; "unrolled": separate per-layer buffers, `make_decode`) and
  expert backend of the decode steps (None: model.expert_backend; "all_experts") and
  compiler options of the decode program (`DECODE_OPTIONS`) yields
  (the row, the run's arrays:
  `prompts_BxP`, `tokens_BxN` (the first token from the prefill, then one per decode step)
  and `expert_ids_NxRxBxK`, the routes of each decode step)."""
  m = cfg.model
  S = prompt_len + new_tokens
  T = time.perf_counter
  prompts_BxP = jnp.asarray(np.random.default_rng(seed).integers(
      0, m.vocab_size, size=(batch, prompt_len)), jnp.int32)
  lengths_B = jnp.full((batch,), prompt_len, jnp.int32)
  t0 = T()
  prefill = jax.jit(make_prefill(cfg, graphdef, gen.cache_length(S))).lower(
      state, prompts_BxP, lengths_B).compile()
  t1 = T()
  first_B, caches = jax.block_until_ready(prefill(state, prompts_BxP, lengths_B))
  prefill_times = []
  for _ in range(reps):
    t2 = T()
    jax.block_until_ready(prefill(state, prompts_BxP, lengths_B))
    prefill_times.append(T() - t2)
  first_tokens_BxN = None
  for layout, label, opts in [(lay, b, o) for lay in layouts for b in backends
                               for o in decode_options]:
    backend, tuning = _backend_and_tuning(label)
    tuning = dict(tuning or {})
    # not the kernels': the attention's decode weights, the decode loop's unrolling
    absorb = tuning.pop("absorb", m.decode_absorb)
    unroll = int(tuning.pop("unroll", gen.decode_unroll()))
    head = tuning.pop("head", gen.GREEDY_HEAD)   # the greedy token's output layer
    tuning = tuning or None
    if layout == "unrolled":
      layers = gen.unstack_layers(nnx.merge(graphdef, state),
                                  stack_experts=gen.stacks_experts(m, backend, batch),
                                  kernel_tuning=tuning, absorb=absorb)
      args = (state, layers, first_B, lengths_B, gen.unstack_caches(caches))
    else:
      layers, args = None, (state, None, first_B, lengths_B, caches)
    t3 = T()
    decode = jax.jit(make_decode(cfg, graphdef, new_tokens, backend, unroll, head)).lower(
        *args).compile(compiler_options=DECODE_OPTIONS[opts]() or None)
    t4 = T()
    out = jax.block_until_ready(decode(*args))  # warm-up
    times = []
    for _ in range(reps):
      t5 = T()
      out = jax.block_until_ready(decode(*args))
      times.append((T() - t5) / new_tokens)
    top = _profile(decode, args, profile, f"b{batch}_{layout}_{label or 'model'}_{opts}",
                   new_tokens, profile_top)
    step_s = float(np.median(times))
    tokens_NxB, ids_NxRxBxK = (np.asarray(a) for a in out)
    per_step = [step_bytes(cfg, np.full(batch, prompt_len + t), ids_NxRxBxK[t])
                for t in range(new_tokens)]  # step t feeds position prompt_len + t
    mean = {k: float(np.mean([b[k] for b in per_step])) for k in per_step[0]}
    limit_s = mean["total"] / HBM_BYTES_PER_S
    R = ids_NxRxBxK.shape[1]
    hit = np.mean([len(np.unique(ids_NxRxBxK[t, r])) for t in range(new_tokens)
                   for r in range(R)]) if R else 0.0
    row = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "layout": layout, "expert_backend": _backend_name(m, backend, batch)
           + (f"[{label.split('[', 1)[1]}" if "[" in (label or "") else ""),
           "absorb": absorb if layout == "unrolled" else "none", "scan_unroll": unroll,
           "greedy_head": head,
           "decode_options": opts, "compiler_options": DECODE_OPTIONS[opts](),
           "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * x for x in times],
           "tokens_per_s": batch / step_s, "bytes_per_step": mean["total"],
           "weight_bytes": mean["fixed_weights"] + mean["experts"],
           "expert_bytes": mean["experts"], "cache_bytes": mean["cache"],
           "experts_hit_per_layer": float(hit), "limit_ms": 1e3 * limit_s,
           "fraction_of_bandwidth": limit_s / step_s,
           "compile_s": t4 - t3, "prefill_compile_s": t1 - t0,
           "prefill_ms": 1e3 * float(np.median(prefill_times)),
           "cache_gb_allocated": cache_bytes_per_position(cfg) * batch * S / 1e9,
           **({"profile_top_ops": top} if top else {})}
    tokens_BxN = np.concatenate([np.asarray(first_B)[:, None], tokens_NxB.T], axis=1)
    if first_tokens_BxN is None:
      first_tokens_BxN = tokens_BxN
    # A sanity check across backends: the first decoded token (one decode step after the
    # same prefill) of each row agrees but for bf16 near-ties; later ones drift apart.
    row["first_decoded_token_agreement"] = float(np.mean(tokens_BxN[:, 1]
                                                         == first_tokens_BxN[:, 1]))
    yield row, {"prompts_BxP": np.asarray(prompts_BxP), "tokens_BxN": tokens_BxN,
                "expert_ids_NxRxBxK": ids_NxRxBxK}
    del layers, args, decode, out


def _profile(decode, args, logdir: str | None, name: str, new_tokens: int,
             top: int = 15) -> list[dict]:
  """With `logdir`: one traced run of the decode loop; prints its top device operations per
  decode step, by kernel name, by JAX name stack (`profile_summary.source`) and by distinct
  kernel (`by="kernel"`: one fusion summed over the layers, with its name stack), and
  returns the three top `top`s ({by, name, category, ms_per_token_step, count, share})."""
  if not logdir:
    return []
  from benchmarks import profile_summary as ps
  folder = re.sub(r"[^\w.+-]", "_", name)   # a tuned label's brackets would glob
  trace = ps.load_trace(ps.capture(decode, *args, logdir=os.path.join(logdir, folder),
                                   warmup=0, steps=1))
  tot = ps.totals(trace, steps=new_tokens)
  text = decode.as_text()
  out, hlo, dedup = [], ps.hlo_op_names(text), ps.hlo_dedup_names(text)  # the GPU's events
  for by in ("name", "source", "kernel"):  # lack the name stack
    rows = ps.summarise(trace, top, by, hlo=hlo, dedup=dedup)
    print(f"  profile {name} by {by} (per decode step):\n" + ps.format_table(rows, tot),
          flush=True)
    out += [{"by": by, "name": r["name"], "category": r["category"], "count": r["count"],
             "ms_per_token_step": r["total_ms"] / new_tokens, "share": r["share"]}
            for r in rows]
  print(f"  profile {name} timeline (per decode step): "
        f"{json.dumps(ps.timeline(trace, new_tokens))}", flush=True)
  return out


# ----------------------------------------------------------------------------- processes


def _child(path: str, args) -> None:
  """One config's batches in this process: a `ROW {json}` line per batch."""
  cfg = load_config(path, args.overrides)
  t0 = time.perf_counter()
  graphdef, state = init_bf16(cfg)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  print(f"  init {init_s:.1f} s (bf16 weights, "
        f"{sum(a.nbytes for a in jax.tree.leaves(state)) / 1e9:.2f} GB)", flush=True)
  backends = [None if b == "model" else b for b in args.decode_backends.split(",")]
  layouts = tuple(args.layouts.split(","))
  for b in args.batches:
    S = args.prompt_len + args.new_tokens
    print(f"  batch {b}: cache {cache_bytes_per_position(cfg) * b * S / 1e9:.2f} GB "
          f"({S} slots x {cache_bytes_per_position(cfg):.0f} bytes per row)", flush=True)
    try:
      for row, _ in run(cfg, graphdef, state, b, args.prompt_len, args.new_tokens, args.reps,
                        tuple(backends), layouts=layouts,
                        decode_options=tuple(args.decode_options.split(",")),
                        profile=args.profile if b in args.profile_batches else None,
                        profile_top=args.profile_top):
        stats = jax.devices()[0].memory_stats() or {}
        row.update(init_s=init_s, peak_mem_gb=stats.get("peak_bytes_in_use", 0) / 2**30,
                   device=jax.devices()[0].device_kind,
                   xla_flags=os.environ.get("XLA_FLAGS", ""))
        print("ROW " + json.dumps({"config": path, **row}), flush=True)
    except Exception as e:  # noqa: BLE001 - one batch's failure (e.g. out of memory) is a row
      row = {"batch": b, "error": f"{type(e).__name__}: {str(e)[:1500]}"}
      print("ROW " + json.dumps({"config": path, **row}), flush=True)


def _dry_run(args) -> None:
  print(f"{'config':<24}{'batch':>6}{'weights GB':>11}{'experts hit':>12}{'cache GB':>9}"
        f"{'total GB':>9}{'limit ms':>9}{'limit tok/s':>12}{'cache alloc GB':>15}")
  for path in args.configs:
    cfg = load_config(path, args.overrides)
    m = cfg.model
    S = args.prompt_len + args.new_tokens
    for b in args.batches:
      # mean over the run's steps: step t attends to prompt_len + t + 1 positions per row
      per_step = [step_bytes(cfg, np.full(b, args.prompt_len + t), None)
                  for t in range(args.new_tokens)]
      mean = {k: float(np.mean([s[k] for s in per_step])) for k in per_step[0]}
      limit_s = mean["total"] / HBM_BYTES_PER_S
      hit = m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** b)
      print(f"{path:<24}{b:>6}{(mean['fixed_weights'] + mean['experts']) / 1e9:>11.3f}"
            f"{hit:>12.1f}{mean['cache'] / 1e9:>9.3f}{mean['total'] / 1e9:>9.3f}"
            f"{1e3 * limit_s:>9.3f}{b / limit_s:>12,.0f}"
            f"{cache_bytes_per_position(cfg) * b * S / 1e9:>15.3f}")


def _write(args, rows) -> None:
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"device": next((r["device"] for r in rows if "device" in r), None),
                 "jax_version": jax.__version__, "date": datetime.date.today().isoformat(),
                 "hbm_bytes_per_s": HBM_BYTES_PER_S, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "reps": args.reps,
                 "weights": "random init, stored in bf16", "overrides": args.overrides,
                 "rows": rows}, fh, indent=1)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default="configs/mohge_3b.yaml,configs/moe_3b.yaml")
  ap.add_argument("--batches", default="256,32,1", help="in this order (the target row first)")
  ap.add_argument("--prompt-len", type=int, default=512)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--decode-backends", default="auto,model,all_experts,capacity",
                  help="the decode steps' expert backends, each timed from the same prefill, "
                       "named as generate's --decode-backend: auto (generate's default: "
                       "capacity from 8 routed rows per expert, else all_experts), model "
                       "(model.expert_backend: the Mosaic GPU kernels on the H200), "
                       "all_experts (dispatch.all_experts), capacity "
                       "(dispatch.capacity_experts), capacity_kernel (the same through "
                       "the Mosaic GPU kernels); a kernel tuning for dispatch.stack_experts "
                       "as NAME[key=value+...], e.g. capacity_kernel[kernel=hgmm+bk=64], "
                       "and absorb=FORM for the attention's (MLA.decode_weights), e.g. "
                       "auto[absorb=both]")
  ap.add_argument("--layouts", default="scan,unrolled",
                  help="how the decode step runs the layers: scan (one lax.scan over the "
                       "stacked weights and cache of each stack) and/or unrolled (separate "
                       "per-layer buffers: generate.unstack_layers)")
  ap.add_argument("--decode-options", default="generate",
                  help="the decode program's compiler options, each its own row: generate "
                       "(what generate compiles decoding with: "
                       "generate.DECODE_COMPILER_OPTIONS on a GPU) and/or xla (XLA's "
                       "defaults)")
  ap.add_argument("--profile", default=None,
                  help="trace one run of each decode loop at --profile-batches into this "
                       "directory and print (and record) its top device operations")
  ap.add_argument("--profile-batches", default="256,1")
  ap.add_argument("--profile-top", type=int, default=15,
                  help="operations listed (and recorded) per profile, by name and by source")
  ap.add_argument("--out", default=None)
  ap.add_argument("--dry-run", action="store_true", help="the byte arithmetic only, no device")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  args.configs = args.configs.split(",")
  args.batches = [int(b) for b in args.batches.split(",")]
  args.profile_batches = [int(b) for b in args.profile_batches.split(",")]
  unknown = sorted(set(args.decode_options.split(",")) - set(DECODE_OPTIONS))
  if unknown:
    ap.error(f"--decode-options: {unknown} not among {sorted(DECODE_OPTIONS)}")
  if args.dry_run:
    _dry_run(args)
    return
  if args.one:
    _child(args.one, args)
    return

  # This process never touches the device: each config's process has it to itself.
  rows = []
  for path in args.configs:
    print(f"{path}: batches {args.batches}, prompt {args.prompt_len}, {args.new_tokens} new "
          "tokens", flush=True)
    cmd = [sys.executable, "-m", "benchmarks.decode", "--one", path,
           "--batches", ",".join(map(str, args.batches)), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--reps", str(args.reps),
           "--decode-backends", args.decode_backends, "--layouts", args.layouts,
           "--decode-options", args.decode_options,
           "--profile-batches", ",".join(map(str, args.profile_batches)),
           "--profile-top", str(args.profile_top),
           *(["--profile", args.profile] if args.profile else []), *args.overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    tail = []
    for line in proc.stdout:
      if line.startswith("ROW "):
        rows.append(json.loads(line[4:]))
        _write(args, rows)
        r = rows[-1]
        print(f"  batch {r['batch']}: " + (f"error {r['error'][:300]}" if "error" in r else
              f"{r['layout']} {r['expert_backend']} ({r.get('decode_options')}): "
              f"{r['step_ms']:.3f} ms/step, "
              f"{r['tokens_per_s']:,.0f} tok/s, "
              f"{r['fraction_of_bandwidth']:.1%} of bandwidth (compile {r['compile_s']:.1f} s)"),
              flush=True)
      else:
        tail = (tail + [line])[-40:]
        if line.startswith("  "):
          sys.stdout.write(line)
    if proc.wait() != 0:
      sys.stdout.write("".join(tail))
      print(f"{path}: process failed ({proc.returncode}); rows so far kept", flush=True)
  print(f"\n{'config':<24}{'batch':>6}{'layout':>9}{'experts':>20}{'options':>9}"
        f"{'step ms':>9}{'tok/s':>10}"
        f"{'GB/step':>9}{'limit ms':>9}{'fraction':>9}{'compile s':>10}{'prefill ms':>11}")
  for r in sorted((r for r in rows if "error" not in r),
                  key=lambda r: (r["config"], r["batch"], r["layout"], r["expert_backend"])):
    print(f"{r['config']:<24}{r['batch']:>6}{r['layout']:>9}{r['expert_backend']:>20}"
          f"{r.get('decode_options', ''):>9}"
          f"{r['step_ms']:>9.3f}"
          f"{r['tokens_per_s']:>10,.0f}"
          f"{r['bytes_per_step'] / 1e9:>9.3f}{r['limit_ms']:>9.3f}"
          f"{r['fraction_of_bandwidth']:>9.1%}{r['compile_s']:>10.1f}{r['prefill_ms']:>11.1f}")
  _write(args, rows)


if __name__ == "__main__":
  main()
