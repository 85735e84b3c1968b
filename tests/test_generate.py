"""Generation: cached decode equals the full forward pass (ragged batches), greedy equals
step-by-step argmax, the cache holds MLA's latent and rope key only (and with DSA the
indexer's key: decoding selects its top-k positions as the forward pass does), the sampler's masks
against numpy, stop tokens, recorded routes, and the command line on a workdir and an export."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mohge_jax import dispatch
from mohge_jax import generate as gen
from mohge_jax.attention import DECODE_WEIGHT_NAMES, MLA, MLACache, MLADecodeWeights
from mohge_jax.config import load_config
from mohge_jax.model import Transformer
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
        "model.dense_ffn_width=48", "model.group_widths=[8,16,24]", "model.experts_per_group=2",
        "model.top_k_groups=2", "model.top_k=3", "model.shared_expert_width=8",
        "model.num_layers=3", "model.max_seq_len=64", "model.init_std=0.1", "train.seq_len=32"]
V = 257


def make_model(seed, extra=()):
  cfg = load_config(str(ROOT / "configs/tiny.yaml"), TINY + list(extra))
  return Transformer(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def full_logits(model, tokens_BxL):
  return model(tokens_BxL)[0]


def ragged(rng, lengths, P):
  rows = [list(rng.integers(0, 256, size=n)) for n in lengths]
  prompts, lens = gen.pad_prompts(rows)
  return np.pad(prompts, ((0, 0), (0, P - prompts.shape[1]))), lens


@functools.partial(nnx.jit, static_argnums=4)
def teacher_forced(model, prompts_BxP, lens_B, fed_BxN, S):
  """Logits [B, N + 1, V]: after each row's prompt (prefill), then after each token of
  fed_BxN (one decode step each)."""
  logits_BxV, caches, _ = gen.prefill(model, prompts_BxP, lens_B, S)
  got = [logits_BxV]
  for t in range(fed_BxN.shape[1]):
    logits_BxV, caches, _ = gen.decode_step(model, fed_BxN[:, t], lens_B + t, caches)
    got.append(logits_BxV)
  return jnp.stack(got, 1)


DSA = ["model.sparse_attention=dsa", "model.dsa_topk=4", "model.dsa_index_heads=2",
       "model.dsa_index_dim=8", "model.dsa_index_rope_dim=4", "model.dsa_query_chunk=4"]


@pytest.mark.parametrize("extra", [
    [], ["model.q_lora_rank=12", "model.ffn=moe", "model.group_widths=[16]",
         "model.experts_per_group=4", "model.top_k_groups=1", "model.scan_layers=false"],
    # DSA, sparse stage: top-4 of up to 12 positions, so the selection matters; with and
    # without query compression (the indexer's queries from c_q or from x).
    DSA, DSA + ["model.q_lora_rank=12"],
    DSA + ["train.dsa_stage=dense_warmup"]])  # warm-up: dense attention, indexer keys cached
def test_cached_decode_equals_full_forward(rng, extra):
  model = make_model(int(rng.integers(1 << 30)), extra)
  B, P, N = 3, 7, 5
  prompts, lens = ragged(rng, [7, 2, 4], P)
  fed = rng.integers(0, 256, size=(B, N))  # teacher-forced continuation
  S = P + N
  got = np.asarray(teacher_forced(model, jnp.asarray(prompts), jnp.asarray(lens),
                                  jnp.asarray(fed), S))
  # One full forward over every row, each right-padded to S (causal: the padding after a
  # row's tokens does not reach their logits; one shape, one compilation).
  seqs = np.zeros((B, S), np.int64)
  for b in range(B):
    seqs[b, :lens[b] + N] = np.concatenate([prompts[b, :lens[b]], fed[b]])
  full = np.asarray(full_logits(model, jnp.asarray(seqs)))
  for b in range(B):
    np.testing.assert_allclose(got[b], full[b, lens[b] - 1:lens[b] + N], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra,absorb", [
    ([], "none"), (["model.q_lora_rank=12"], "none"), (DSA + ["model.q_lora_rank=12"], "none"),
    ([], "query"), ([], "output"), (["model.q_lora_rank=12"], "both"), (DSA, "both")])
@pytest.mark.parametrize("stacked", [False, True])
def test_decode_with_prepared_weights_equals_decode_without(rng, extra, absorb, stacked):
  """MLA.decode(prepared=decode_weights(absorb)) (fused projections, q_nope's apart,
  heads-leading W_UK and W_UV; or those multiplied into q_nope's projection and w_o) gives
  the output and cache of MLA.decode from the module's weights, float32, at positions
  ragged across rows, on a layer's cache or a stack's (`layer`); unabsorbed, the prepared
  weights hold the projections' numbers once (as many as the module's)."""
  m = load_config(str(ROOT / "configs/tiny.yaml"), TINY + extra).model
  attn = MLA(m, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  prepared = attn.decode_weights(absorb)
  H, P, V, C = m.num_heads, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank
  own = sum(getattr(attn, n)[...].size for n in DECODE_WEIGHT_NAMES if hasattr(attn, n))
  query, output = absorb in ("query", "both"), absorb in ("output", "both")
  assert sum(a.size for a in jax.tree.leaves(prepared)) == (
      own + query * (m.q_lora_rank or m.d_model) * H * (C - P) - query * H * P * C
      + output * H * C * m.d_model - output * H * V * (C + m.d_model))
  assert prepared.w_uk_HxPxC is None if query else prepared.w_uk_HxPxC.shape == (H, P, C)
  assert prepared.w_uv_HxCxV is None if output else prepared.w_uv_HxCxV.shape == (H, C, V)
  assert prepared.w_o.shape == ((H * C) if output else (H * V), m.d_model)
  assert (prepared.w_uq is None) == (m.q_lora_rank == 0)
  assert prepared.w_q_nope.shape == (m.q_lora_rank or m.d_model, H * (C if query else P))
  B, S = 4, 16
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  lead = (2,) if stacked else ()
  cache = MLACache(normal(*lead, B, S, m.kv_lora_rank), normal(*lead, B, S, m.qk_rope_head_dim),
                   normal(*lead, B, S, m.dsa_index_dim) if "dsa" in str(extra) else None)
  x_Bx1xD, positions_B = normal(B, 1, m.d_model), jnp.asarray([0, 5, 15, 9], jnp.int32)
  layer = jnp.int32(1) if stacked else None
  decode = nnx.jit(lambda attn, x, p, c, prepared: attn.decode(x, p, c, layer, prepared))
  want, want_cache = decode(attn, x_Bx1xD, positions_B, cache, None)
  got, got_cache = decode(attn, x_Bx1xD, positions_B, cache, prepared)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-5, atol=1e-6), got_cache, want_cache)
  assert not np.allclose(np.asarray(got_cache.latent), np.asarray(cache.latent))  # written


def test_bf16_absorbed_decode_error_is_the_forward_passs_own(rng):
  """bf16 parameters and compute: the cached, absorbed decode's logits against a float32
  forward pass of the same bf16-rounded weights are as close as the bf16 full forward
  pass's own logits are. Measured (seeds 0-5, logits up to |2.2|): max error of the decode
  0.0131-0.0161, of the full forward 0.0107-0.0171, their ratio 0.85-1.27 (about one bf16
  step, 2^-6, at |logit| in [2, 4)); the float32 decode's is < 1e-6. So the bound is 2x the
  forward pass's bf16 error measured in the same run: the absorbed form (W_UK folded into
  the query, attention over the latent) rounds differently, not more. Dense FFNs: a bf16
  rounding may flip a routing decision, which changes the function, not its rounding."""
  seed = int(rng.integers(1 << 30))
  model32, model16 = (make_model(seed, ["model.ffn=dense", *dt])
                      for dt in ([], ["model.dtype=bfloat16"]))
  params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(model16))
  nnx.update(model16, params16)
  nnx.update(model32, jax.tree.map(lambda a: a.astype(jnp.float32), params16))
  B, P, N = 3, 7, 5
  prompts, lens = ragged(rng, [7, 2, 4], P)
  fed = rng.integers(0, 256, size=(B, N))
  got = np.asarray(teacher_forced(model16, jnp.asarray(prompts), jnp.asarray(lens),
                                  jnp.asarray(fed), P + N))
  err_decode = err_full = 0.0
  for b in range(B):
    seq = jnp.asarray(np.concatenate([prompts[b, :lens[b]], fed[b]])[None])
    want = np.asarray(full_logits(model32, seq))[0, lens[b] - 1:, :V]
    full16 = np.asarray(full_logits(model16, seq))[0, lens[b] - 1:, :V]
    err_decode = max(err_decode, np.abs(got[b, :, :V] - want).max())
    err_full = max(err_full, np.abs(full16 - want).max())
  assert 0 < err_decode <= 2 * err_full, (err_decode, err_full)


@pytest.mark.parametrize("extra", [[], DSA])
def test_cache_holds_latent_and_rope_key_only(rng, extra):
  """Per position: the latent and the rope key (and with DSA the indexer's key), nothing
  per head."""
  model = make_model(0, extra)
  m = model.cfg.model
  _, caches, routes = gen.prefill(model, jnp.zeros((2, 5), jnp.int32), jnp.full((2,), 5), 9)
  assert [tuple(s.num for s in model.stacks)] == [(1, 2)]
  for cache, n in zip(caches, (1, 2)):
    assert isinstance(cache, MLACache)
    assert [a.shape for a in jax.tree.leaves(cache)] == [
        (n, 2, 9, m.kv_lora_rank), (n, 2, 9, m.qk_rope_head_dim),
        *([(n, 2, 9, m.dsa_index_dim)] if extra else [])]
    assert (cache.index_key is None) == (not extra)
  assert routes[0] is None and routes[1].expert_ids.shape == (2, 2, 5, m.top_k)


def test_greedy_is_deterministic_and_stepwise_argmax(rng):
  model = make_model(int(rng.integers(1 << 30)))
  prompts, lens = ragged(rng, [3, 6, 1], 6)
  kw = dict(max_new_tokens=6, temperature=0.0)
  out = gen.generate(model, prompts, lens, jax.random.key(0), **kw)
  again = gen.generate(model, prompts, lens, jax.random.key(1), return_mask=False, **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
  assert again.sampling_mask is None
  assert np.all(np.asarray(out.lengths) == 6) and np.all(np.asarray(out.logprobs) == 0)
  seqs = gen.sequences(prompts, lens, out)
  for b in range(3):
    logits = np.asarray(full_logits(model, jnp.asarray(seqs[b:b + 1, :lens[b] + 5])))[0]
    want = np.argmax(logits[lens[b] - 1:, :V], axis=-1)
    np.testing.assert_array_equal(np.asarray(out.tokens)[b], want)
    mask = np.asarray(out.sampling_mask)[b]
    assert mask.sum() == 6 and np.all(mask[np.arange(6), want])


def test_greedy_heads_pick_the_logits_argmax(rng, monkeypatch):
  """generate.greedy_tokens: head="xla" is the argmax of the step's logits over the valid
  vocabulary; head="kernel" (the fused output layer, run in the Pallas GPU interpreter)
  picks a token whose float32 logit is the row's maximum (its sums' order may differ
  from XLA's, so an exact near-tie may go either way); an unknown head is refused."""
  from pallas_kernels import head_gpu
  model = make_model(int(rng.integers(1 << 30)), ["model.d_model=64", "model.dtype=bfloat16",
                                                  "model.vocab_pad_multiple=128"])
  x_Bx1xD = jnp.asarray(rng.normal(size=(5, 1, 64)), jnp.bfloat16)
  logits_BxV = np.asarray(gen._logits(model, x_Bx1xD)[:, 0])
  assert logits_BxV.shape[1] == 384   # 257 padded: the padded columns must not be picked
  want_B = np.argmax(logits_BxV[:, :V], axis=-1)
  np.testing.assert_array_equal(np.asarray(gen.greedy_tokens(model, x_Bx1xD, "xla")), want_B)
  monkeypatch.setattr(head_gpu, "greedy_head", functools.partial(
      head_gpu.greedy_head, interpret=True, num_ctas=2))
  got_B = np.asarray(gen.greedy_tokens(model, x_Bx1xD, "kernel"))
  best_B = logits_BxV[np.arange(5), want_B]
  assert np.all(got_B < V)
  np.testing.assert_allclose(logits_BxV[np.arange(5), got_B], best_B, rtol=1e-5)
  with pytest.raises(ValueError, match="greedy head 'argmax'"):
    gen.greedy_tokens(model, x_Bx1xD, "argmax")


def test_greedy_generate_takes_its_tokens_from_the_greedy_head(rng, monkeypatch):
  """generate at temperature 0 draws through generate.GREEDY_HEAD: the fused kernel
  (interpreted) gives the tokens and one-hot sampling masks of XLA's logits and argmax (a
  bf16 model: the same float32 sums up to their order, no near-tie at these sizes)."""
  from pallas_kernels import head_gpu
  model = make_model(int(rng.integers(1 << 30)), ["model.d_model=64", "model.dtype=bfloat16",
                                                  "model.vocab_pad_multiple=128"])
  calls, kernel = [], head_gpu.greedy_head

  def interpreted(*a, **k):
    calls.append(a[0].shape)
    return kernel(*a, **k, interpret=True, num_ctas=2)
  monkeypatch.setattr(head_gpu, "greedy_head", interpreted)
  prompts, lens = ragged(rng, [3, 5], 5)
  outs = {}
  for head in ("xla", "kernel"):
    monkeypatch.setattr(gen, "GREEDY_HEAD", head)
    outs[head] = gen.generate(model, prompts, lens, jax.random.key(0), max_new_tokens=4,
                              temperature=0.0)
    assert bool(calls) == (head == "kernel")
  assert calls[0] == (2, 64)   # the decode steps' output layer
  np.testing.assert_array_equal(np.asarray(outs["kernel"].tokens),
                                np.asarray(outs["xla"].tokens))
  np.testing.assert_array_equal(np.asarray(outs["kernel"].sampling_mask),
                                np.asarray(outs["xla"].sampling_mask))


def test_generate_decode_options_sample_the_same(rng, monkeypatch):
  """generate(decode_backend=..., unrolled=...) draws the tokens of the layer scan with the
  model's expert backend (same key, temperature 1) and records the same routes: the options
  change how, not what; each option reaches the decode step (its code path is traced); an
  unknown backend is refused. The default (auto, unrolled) is one of them."""
  from mohge_jax import experts
  used = set()
  for mod, name in ((experts, "capacity_experts"), (experts, "all_experts"),
                    (gen, "_decode_step_unrolled")):
    fn = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, _f=fn, _n=name, **k: used.add(_n) or _f(*a, **k))
  jax.clear_caches()   # traced anew here, whatever an earlier test (or repeat) compiled
  model = make_model(int(rng.integers(1 << 30)))
  prompts, lens = ragged(rng, [3, 6, 1, 5], 6)
  kw = dict(max_new_tokens=6, temperature=1.0, record_routes=True)
  want = gen.generate(model, prompts, lens, jax.random.key(3), decode_backend=None,
                     unrolled=False, **kw)
  assert not used
  for opts in (dict(decode_backend="capacity", unrolled=True),
               dict(decode_backend="all_experts", unrolled=False), {}):
    got = gen.generate(model, prompts, lens, jax.random.key(3), **opts, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.routes.expert_ids),
                                  np.asarray(want.routes.expert_ids))
  assert used == {"capacity_experts", "all_experts", "_decode_step_unrolled"}
  with pytest.raises(ValueError, match="decode_backend='fast'"):
    gen.generate(model, prompts, lens, jax.random.key(3), decode_backend="fast", **kw)


def test_unrolled_decode_loop_samples_the_same(rng, monkeypatch):
  """generate with several decode steps a loop iteration (`decode_unroll`, a GPU's
  DECODE_UNROLL; here 4 over 6 steps: an iteration and a remainder) draws the tokens of one
  step an iteration (same key, temperature 1) and records the same routes; decode_unroll
  is DECODE_UNROLL on a GPU backend only."""
  for backend, want in (("gpu", gen.DECODE_UNROLL), ("cpu", 1), ("tpu", 1)):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert gen.decode_unroll() == want
  monkeypatch.undo()
  model = make_model(int(rng.integers(1 << 30)))
  prompts, lens = ragged(rng, [3, 6, 1], 6)
  kw = dict(max_new_tokens=6, temperature=1.0, record_routes=True)
  want = gen.generate(model, prompts, lens, jax.random.key(5), **kw)
  monkeypatch.setattr(gen, "decode_unroll", lambda: 4)
  scans = []
  scan = jax.lax.scan
  monkeypatch.setattr(jax.lax, "scan", lambda *a, **k: scans.append(k.get("unroll")) or
                      scan(*a, **k))
  got = gen.generate(model, prompts, lens, jax.random.key(5), **kw)
  assert 4 in scans   # traced anew with the unrolled loop
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.routes.expert_ids),
                                np.asarray(want.routes.expert_ids))


def test_decode_compiler_options_reach_generates_program(rng, monkeypatch):
  """generate compiles its program with `decode_compiler_options`: XLA's command-buffer
  scheduling on a GPU backend, nothing elsewhere. XLA takes the options' names and values
  (it refuses a value it does not know, by name), and generate's program is compiled
  with whatever the function returns (a refused value fails generate)."""
  for backend, want in (("gpu", gen.DECODE_COMPILER_OPTIONS), ("cpu", {}), ("tpu", {})):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert gen.decode_compiler_options() == want
  monkeypatch.undo()
  x = jnp.asarray(rng.normal(size=8), jnp.float32)
  f = jax.jit(lambda a: a * 2 + 1, compiler_options=gen.DECODE_COMPILER_OPTIONS)
  np.testing.assert_allclose(np.asarray(f(x)), np.asarray(x) * 2 + 1)
  with pytest.raises(Exception, match="BOGUS"):
    jax.jit(lambda a: a * 3, compiler_options={
        "xla_gpu_command_buffer_scheduling_mode": "BOGUS"})(x)
  model = make_model(int(rng.integers(1 << 30)))
  prompts, lens = ragged(rng, [2, 4], 4)
  monkeypatch.setattr(gen, "decode_compiler_options",
                      lambda: {"xla_gpu_command_buffer_scheduling_mode": "BOGUS"})
  with pytest.raises(Exception, match="BOGUS"):
    gen.generate(model, prompts, lens, jax.random.key(0), max_new_tokens=2)


def test_capacity_kernel_decode_backend_matches_capacity(rng, monkeypatch):
  """decode_backend="capacity_kernel": each routed layer's experts stacked once
  (`unstack_layers(stack_experts=True)`) and the slot blocks through the Mosaic GPU
  kernels (here the Pallas interpreter), against "capacity" from the same prefilled cache
  on the same fed tokens, step after step: every row's routes alike until a near-tie flips
  one (bf16 sums in another order; from then on that row's cache differs too, so it leaves
  the comparison), logits within bf16's reach on the rows still alike, and the greedy token
  the same wherever capacity's top two logits are further apart than the two backends'
  logits differ. generate takes it, and refuses it with the layer scan."""
  monkeypatch.setattr(dispatch, "DECODE_KERNEL_TUNING", {"bm": 64, "interpret": True})
  model = make_model(int(rng.integers(1 << 30)), [
      "model.d_model=128", "model.group_widths=[128,256]", "model.experts_per_group=2",
      "model.top_k_groups=1", "model.top_k=2", "model.first_dense_layers=1",
      "model.dtype=bfloat16"])
  B, P, N, V = 4, 6, 4, model.cfg.model.vocab_size
  prompts, lens = ragged(rng, [3, 6, 1, 5], P)
  fed = jnp.asarray(rng.integers(0, V, size=(B, N)))
  _, caches, _ = gen.prefill(model, jnp.asarray(prompts), jnp.asarray(lens), P + N)
  step = nnx.jit(gen.decode_step, static_argnames=("expert_backend",))
  out = {}
  for backend, stacked in (("capacity", False), ("capacity_kernel", True)):
    layers, flat = gen.unstack_layers(model, stack_experts=stacked), gen.unstack_caches(caches)
    logits, ids = [], []
    for t in range(N):
      logits_BxV, flat, routes = step(model, fed[:, t], jnp.asarray(lens + t), flat,
                                      expert_backend=backend, layers=layers)
      logits.append(np.asarray(logits_BxV, np.float32)[:, :V])
      # Each routed stack's ids are [layers, B, 1, k]: rows leading, every layer's choice.
      ids.append(np.concatenate([np.moveaxis(np.asarray(r.expert_ids), 1, 0).reshape(B, -1)
                                 for r in routes if r is not None], axis=1))
    out[backend] = np.stack(logits), np.stack(ids)
  (want, want_ids), (got, got_ids) = out["capacity"], out["capacity_kernel"]
  alike_NxB = np.cumprod(np.all(got_ids == want_ids, axis=-1), axis=0).astype(bool)
  assert alike_NxB.mean() >= 0.75  # a near-tie may flip a row now and then, not many
  diff = np.abs(got - want)[alike_NxB].max()
  assert diff < 0.1 and np.abs(want).max() > 1  # bf16 rounding (measured 0.02-0.03)
  top2 = np.sort(want, axis=-1)[..., -2:]
  sure = (top2[..., 1] - top2[..., 0] > 2 * diff) & alike_NxB
  assert sure.mean() > 0.4
  np.testing.assert_array_equal(got.argmax(-1)[sure], want.argmax(-1)[sure])
  kw = dict(max_new_tokens=3, temperature=0.0, record_routes=True)
  got = gen.generate(model, prompts, lens, jax.random.key(3), decode_backend="capacity_kernel",
                     **kw)
  assert got.tokens.shape == (B, 3) and got.routes.expert_ids.shape[1] == B
  layers = gen.unstack_layers(model, stack_experts=True)
  assert [layer.experts is None for stack in layers for layer in stack] == [
      s.layers.ffn_kind == "dense" for s in model.stacks for _ in range(s.num)]
  with pytest.raises(ValueError, match="capacity_kernel' needs unrolled=True"):
    gen.generate(model, prompts, lens, jax.random.key(3), decode_backend="capacity_kernel",
                 unrolled=False, **kw)


def test_decode_pdl_reaches_the_slot_kernels(rng, monkeypatch):
  """model.decode_pdl: unstack_layers stacks each routed layer's experts with pdl=1 (the
  slot kernels' programmatic dependent launch; `test_dispatch` checks their values), an
  explicit kernel tuning still winning; off: no pdl key."""
  monkeypatch.setattr(dispatch, "DECODE_KERNEL_TUNING", {"bm": 64, "interpret": True})
  flags = ["model.d_model=128", "model.group_widths=[128,256]", "model.experts_per_group=2",
           "model.top_k_groups=1", "model.top_k=2", "model.first_dense_layers=1",
           "model.dtype=bfloat16"]
  for pdl in (False, True):
    model = make_model(int(rng.integers(1 << 30)), [*flags, f"model.decode_pdl={pdl}"])
    for tuning, want in ((None, int(pdl)), ({"pdl": 0}, 0)):
      stacked = [layer.experts for stack in gen.unstack_layers(model, True, tuning)
                 for layer in stack if layer.experts is not None]
      assert stacked and all(dict(s.tuning).get("pdl", 0) == want for s in stacked)


def test_auto_decode_backend_follows_rows_per_expert():
  """decode_backend="auto": capacity slots from 8 routed rows per expert on average, every
  expert on every token below (MoHGE-3B: 64 experts, top 6: the switch at 86 tokens)."""
  m = load_config(str(ROOT / "configs/mohge_3b.yaml")).model
  assert (m.num_experts, m.top_k) == (64, 6)
  assert gen.decode_expert_backend(m, 256) == "capacity"
  assert gen.decode_expert_backend(m, 86) == "capacity"
  assert gen.decode_expert_backend(m, 85) == "all_experts"
  assert gen.decode_expert_backend(m, 1) == "all_experts"


def test_auto_decode_backend_takes_the_kernels_on_hopper(monkeypatch):
  """On a Hopper GPU (faked) auto's capacity slots go through the Mosaic GPU kernels when
  they take the widths (MoHGE-3B, bf16), and generate then stacks the experts; not for
  widths off the kernels' tiles, float32, one group of experts (MoE-3B), or below 8 rows
  per expert, but for fewer token-expert pairs than experts (the chosen experts only:
  MoHGE-3B and MoE-3B below 11 tokens)."""
  import pallas_kernels
  m = load_config(str(ROOT / "configs/mohge_3b.yaml")).model
  assert not gen.stacks_experts(m, "auto", 256)  # this CPU
  resolve = pallas_kernels.resolve_backend
  monkeypatch.setattr(pallas_kernels, "resolve_backend",
                      lambda b="auto": "mosaic_gpu" if b == "auto" else resolve(b))
  assert gen.decode_expert_backend(m, 256) == "capacity_kernel"
  assert gen.decode_expert_backend(m, 85) == "all_experts"
  assert gen.decode_expert_backend(m, 11) == "all_experts"   # 66 pairs, 64 experts
  assert gen.decode_expert_backend(m, 10) == "capacity_kernel"
  assert gen.decode_expert_backend(m, 1) == "capacity_kernel"
  assert gen.stacks_experts(m, "auto", 256) and not gen.stacks_experts(m, "auto", 32)
  assert gen.stacks_experts(m, "auto", 1)
  monkeypatch.setitem(dispatch.DECODE_KERNEL_TUNING, "sparse", 0)   # the kernels' whole
  assert gen.decode_expert_backend(m, 1) == "all_experts"           # block: XLA's instead
  monkeypatch.setitem(dispatch.DECODE_KERNEL_TUNING, "sparse", 1)
  assert gen.stacks_experts(m, "capacity_kernel", 1)
  assert not gen.stacks_experts(m, "capacity", 256)
  for bad in (["model.group_widths=[384,448,512,576,640,704,768,832]"],
              ["model.dtype=float32"]):
    mb = load_config(str(ROOT / "configs/mohge_3b.yaml"), bad).model
    assert gen.decode_expert_backend(mb, 256) == "capacity", bad
  moe = load_config(str(ROOT / "configs/moe_3b.yaml")).model  # one group: XLA's product
  assert gen.decode_expert_backend(moe, 256) == "capacity"
  assert gen.decode_expert_backend(moe, 32) == "all_experts"
  assert gen.decode_expert_backend(moe, 10) == "capacity_kernel"   # but the chosen only
  assert gen.stacks_experts(moe, "capacity_kernel", 256)  # asked for by name: taken


def mask_reference(logits, temperature, top_k, top_p, vocab):
  """numpy, float64, one row at a time."""
  out = np.zeros(logits.shape, bool)
  for b, row in enumerate(logits.astype(np.float64)):
    x = np.where(np.arange(len(row)) < vocab, row, -np.inf)
    if temperature == 0:
      out[b, np.argmax(x)] = True
      continue
    x = x / temperature
    order = np.argsort(-x, kind="stable")
    keep = order[:top_k] if top_k else order[:vocab]
    keep = keep[np.isfinite(x[keep])]   # a -inf logit is never drawn
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    out[b, keep[before < top_p] if top_p < 1 else keep] = True
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.5, 20, 0.9), (0.0, 0, 1.0), (1.0, 1, 0.5)])
def test_sampling_masks_match_numpy(rng, temperature, top_k, top_p):
  """(Temperature alone, the first case, takes every valid entry without sorting; a -inf
  logit, as a caller's mask leaves, is never allowed.)"""
  logits = (rng.standard_normal((4, 300)) * 2).astype(np.float32)
  logits[1, :40] = logits[1, 0]  # ties resolve to the lower id
  logits[2, 7] = -np.inf
  allowed, scaled = gen.sampling_mask(jnp.asarray(logits), vocab_size=V,
                                      temperature=temperature, top_k=top_k, top_p=top_p)
  want = mask_reference(logits, temperature, top_k, top_p, V)
  np.testing.assert_array_equal(np.asarray(allowed), want)
  assert not np.asarray(allowed)[:, V:].any()
  tokens, logp, allowed2 = gen.sample(jax.random.key(int(rng.integers(1 << 30))),
                                      jnp.asarray(logits), vocab_size=V, temperature=temperature,
                                      top_k=top_k, top_p=top_p)
  tokens, logp = np.asarray(tokens), np.asarray(logp)
  assert want[np.arange(4), tokens].all()
  if temperature:
    x = np.where(want, logits.astype(np.float64) / temperature, -np.inf)
    top = x.max(1, keepdims=True)
    ref = x - top - np.log(np.exp(x - top).sum(1, keepdims=True))
    np.testing.assert_allclose(logp, ref[np.arange(4), tokens], rtol=1e-5, atol=1e-5)


def test_stop_tokens_end_rows(rng):
  model = make_model(int(rng.integers(1 << 30)))
  prompts, lens = ragged(rng, [4, 2, 5, 3], 5)
  free = gen.generate(model, prompts, lens, jax.random.key(3), max_new_tokens=6, top_k=4)
  toks = np.asarray(free.tokens)
  stop = int(toks[0, 2])  # row 0 stops at step 2 at the latest
  out = gen.generate(model, prompts, lens, jax.random.key(3), max_new_tokens=6, top_k=4,
                     stop_ids=(stop,), pad_id=-1)
  got, n = np.asarray(out.tokens), np.asarray(out.lengths)
  for b in range(4):
    hits = np.flatnonzero(toks[b] == stop)
    want_n = hits[0] + 1 if len(hits) else 6
    assert n[b] == want_n
    np.testing.assert_array_equal(got[b, :want_n], toks[b, :want_n])  # same draws until then
    assert np.all(got[b, want_n:] == -1) and np.all(np.asarray(out.logprobs)[b, want_n:] == 0)
    assert not np.asarray(out.sampling_mask)[b, want_n:].any()
  assert n[0] <= 3


def test_recorded_routes_replay_the_forward_pass(rng):
  model = make_model(int(rng.integers(1 << 30)))
  prompts, lens = ragged(rng, [5, 2], 5)
  out = gen.generate(model, prompts, lens, jax.random.key(5), max_new_tokens=4,
                     record_routes=True)
  seqs = jnp.asarray(gen.sequences(prompts, lens, out))
  r = out.routes
  assert r.expert_ids.shape == (2, 2, 9, 3) and r.group_ids.shape == (2, 2, 9, 2)
  free = np.asarray(full_logits(model, seqs))
  forced = np.asarray(nnx.jit(lambda m, t, f: m(t, forced=f)[0])(model, seqs, r))
  for b, n in enumerate(lens + np.asarray(out.lengths)):  # the padding's routes are not kept
    np.testing.assert_allclose(forced[b, :n], free[b, :n], rtol=1e-5, atol=1e-5)


def _run(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                        timeout=600, cwd=ROOT, **kw)


def test_cli_on_workdir_and_export(tmp_path, capsys):
  micro = [o for o in TINY if not o.startswith(("model.max_seq_len", "model.init_std",
                                                "train.seq_len"))]
  workdir = tmp_path / "run"
  r = _run([str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"), "--workdir",
            str(workdir), "--steps", "2", *micro, "train.batch_size=4", "train.seq_len=32",
            "train.warmup_steps=1", "train.eval_every=100", "train.eval_batches=1",
            "train.ckpt_every=2",
            f"data.cache_dir={tmp_path / 'cache'}"])
  assert r.returncode == 0, r.stdout + r.stderr
  (tmp_path / "prompts.txt").write_text("def \nimport os\\nimport \n")
  r = _run(["-m", "mohge_jax.generate", str(workdir), "--prompt", "x = ", "--batch-file",
            str(tmp_path / "prompts.txt"), "--max-new-tokens", "5", "--top-k", "10"])
  assert r.returncode == 0, r.stdout + r.stderr
  assert r.stdout.count("=== prompt") == 3 and "import os\nimport " in r.stdout
  from mohge_jax import export
  export.export_workdir(workdir, tmp_path / "export", dtype="f32")
  r = _run(["-m", "mohge_jax.generate", str(tmp_path / "export"), "--prompt", "hello",
            "--max-new-tokens", "4", "--temperature", "0", "--decode-backend", "capacity",
            "--scan-layers"])
  assert r.returncode == 0, r.stdout + r.stderr
  assert "=== prompt 0: 'hello'" in r.stdout
  # The refusal comes before any model is built: main() in this process (no JAX import).
  assert gen.main([str(tmp_path), "--prompt", "x"]) == 2
  assert "neither an export" in capsys.readouterr().err


# (without DSA and query compression: test_generate_decode_options...)
@pytest.mark.parametrize("extra,absorb", [(DSA, "none"), (["model.q_lora_rank=12"], "none"),
                                          (["model.q_lora_rank=12"], "both")])
def test_unrolled_decode_over_separate_layer_buffers_equals_the_scan(rng, extra, absorb):
  """decode_step(layers=unstack_layers(model, absorb=)) on per-layer caches gives the
  scan's logits, caches and routes, step after step (the layers read separate buffers, not
  slices, and the attention's projections from `MLA.decode_weights` only: their copies in
  the layer states are empty; absorbed or not)."""
  model = make_model(int(rng.integers(1 << 30)), ["model.first_dense_layers=1", *extra])
  B, P, N = 3, 7, 4
  prompts, lens = ragged(rng, [7, 2, 4], P)
  fed = rng.integers(0, 256, size=(B, N))
  _, caches, _ = gen.prefill(model, jnp.asarray(prompts), jnp.asarray(lens), P + N)
  layers, flat = gen.unstack_layers(model, absorb=absorb), gen.unstack_caches(caches)
  assert [len(s) for s in layers] == [s.num for s in model.stacks] == [len(c) for c in flat]
  assert all((one.attn.w_uk_HxPxC is None) == (absorb == "both") for st in layers for one in st)
  # unstacking again (generate unstacks in every call) traces nothing again
  traced, decode_weights = [], MLA.decode_weights
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(MLA, "decode_weights",
               lambda self, *a: traced.append(1) or decode_weights(self, *a))
    again = gen.unstack_layers(model, absorb=absorb)
  assert not traced
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               [[(one.state, one.attn) for one in st] for st in again],
               [[(one.state, one.attn) for one in st] for st in layers])
  for layer in (layer for stack in layers for layer in stack):
    attn = nnx.to_pure_dict(layer.state["attn"])
    assert {k for k, a in attn.items() if getattr(a, "size", 1) == 0} == (
        set(DECODE_WEIGHT_NAMES) & set(attn))
    assert isinstance(layer.attn, MLADecodeWeights)
  step = nnx.jit(gen.decode_step)  # (op by op, the unrolled step compiles every op apart)
  for t in range(N):
    want, caches, routes = step(model, jnp.asarray(fed[:, t]), jnp.asarray(lens + t), caches)
    got, flat, routes_u = step(model, jnp.asarray(fed[:, t]), jnp.asarray(lens + t), flat,
                               layers=layers)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for stacked, per_layer in zip(caches, flat):
      for i, c in enumerate(per_layer):
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(  # op-by-op vs scanned
            np.asarray(a[i]), np.asarray(b), rtol=1e-5, atol=1e-6), stacked, c)
    assert [r is None for r in routes] == [r is None for r in routes_u]
    for r, ru in zip(routes, routes_u):
      if r is not None:
        np.testing.assert_array_equal(np.asarray(r.expert_ids), np.asarray(ru.expert_ids))
