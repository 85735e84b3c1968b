"""pallas_kernels/route_gpu.py, decode's routing and slot assignment in one kernel: its
reference against float64 numpy, the kernel in the GPU interpreter against the reference
(two-level and top-K routing, every combine, overflow), its CUDA lowering here, the routed
layer through it against the layer without it; the kernel against the reference on a
Hopper GPU (skipped without one)."""
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from mohge_jax import dispatch
from mohge_jax.config import load_config
from mohge_jax.experts import RoutedFFN
from pallas_kernels import route_gpu as rg

MOHGE = dict(num_groups=8, top_k_groups=4, top_k=6)   # MoHGE-3B's router: 8 x 8 experts
MOE = dict(num_groups=0, top_k_groups=1, top_k=6)


def _logits(rng, T, G, E, skew=None):
  # on a grid of 2^-10: two logits differ by 2^-10 or tie exactly (both sides then take the
  # lower index). Float32 resolves 2^-10 after the skew's +40 (whose ulp is 2^-18), where
  # free values a few float32 ulps apart swapped at the k-th choice (the kernel's float32
  # against numpy's float64; seed 2572318782).
  logits = np.round(rng.normal(size=(T, G + E)) * 2.0 * 1024) / 1024
  if skew is not None:   # expert `skew` far ahead in every row: more pairs than C
    logits[:, G + skew] += 40.0
    if G:
      logits[:, skew // (E // G)] += 40.0
  return jnp.asarray(logits, jnp.float32)


def _numpy_route(logits, G, Kg, K, combine, C):
  """Float64 numpy: MoHGE's two-level router (spec §2) or softmax top-K, then each pair's
  slot (its rank among its expert's pairs in token order, clipped to C - 1)."""
  x = np.asarray(logits, np.float64)
  T, E = x.shape[0], x.shape[1] - G
  if G:
    N = E // G
    s = 1.0 / (1.0 + np.exp(-x[:, :G]))
    gids = np.argsort(-s, axis=1, kind="stable")[:, :Kg]
    p = np.zeros_like(s)
    np.put_along_axis(p, gids, np.take_along_axis(s, gids, 1), 1)
    p /= p.sum(1, keepdims=True)
    v = x[:, G:].reshape(T, G, N)
    q = np.exp(v - v.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    r = (p[:, :, None] * q).reshape(T, E)
    r /= r.sum(1, keepdims=True)
  else:
    gids = np.zeros((T, 1), np.int64)
    r = np.exp(x - x.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
  ids = np.argsort(-r, axis=1, kind="stable")[:, :K]
  vals = np.take_along_axis(r, ids, 1)
  if combine == "softmax":
    w = np.exp(vals - vals.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
  elif combine == "renormalize":
    w = vals / vals.sum(1, keepdims=True)
  else:
    w = vals
  seen = np.zeros(E, np.int64)
  slots = np.zeros_like(ids)
  for t in range(T):
    for k in range(K):
      slots[t, k] = ids[t, k] * C + min(seen[ids[t, k]], C - 1)
      seen[ids[t, k]] += 1
  return ids, w, gids, slots, seen.max() > C


def _check(got, want, overflow_ok=True):
  """The kernel's routes against float64 numpy's: the same experts with the same weights
  and slots a token; in the same order, but for experts whose float64 weights tie within
  float32's reach (the kernel orders by float32 values: two logits a few ulps apart may
  swap; a token's slots do not depend on the order of its experts)."""
  ids, w, gids, slots, overflow = want
  got_ids, got_w, got_slots = (np.asarray(a) for a in (got.expert_ids, got.weights, got.slots))
  by_id = lambda i, *cols: [np.take_along_axis(np.asarray(a), np.argsort(i, 1), 1)  # noqa: E731
                            for a in (i, *cols)]
  g_ids, g_w, g_slots = by_id(got_ids, got_w, got_slots)
  w_ids, w_w, w_slots = by_id(ids, w, slots)
  np.testing.assert_array_equal(g_ids, w_ids)
  np.testing.assert_allclose(g_w, w_w, rtol=2e-6, atol=1e-7)
  np.testing.assert_array_equal(g_slots, w_slots)
  # where the order differs, the expert the kernel put there weighs what the reference's
  # does there, to float32's rounding (w_w is by id: an id's place is its rank in the row)
  swapped = got_ids != ids
  w_of_got = np.take_along_axis(w_w, np.argsort(np.argsort(got_ids, 1), 1), 1)
  np.testing.assert_allclose(w_of_got[swapped], w[swapped], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.group_ids), gids)
  assert bool(got.overflow) == overflow
  if got.counts is not None:   # impl="triton": each expert's pairs, each filled slot's token
    E = np.asarray(got.counts).shape[0]
    np.testing.assert_array_equal(got.counts, np.bincount(ids.ravel(), minlength=E))
    if not overflow:
      T = ids.shape[0]
      np.testing.assert_array_equal(np.asarray(got.slot_tokens)[slots],
                                    np.repeat(np.arange(T)[:, None], ids.shape[1], 1))


@pytest.mark.parametrize("router,combine", [("mohge", "softmax"), ("mohge", "raw"),
                                            ("moe", "renormalize"), ("moe", "softmax")])
def test_reference_equals_float64(rng, router, combine):
  kw = MOHGE if router == "mohge" else MOE
  G, T, C = kw["num_groups"], 128, 24
  logits = _logits(rng, T, G, 64)
  want = _numpy_route(logits, G, kw["top_k_groups"], kw["top_k"], combine, C)
  _check(rg.reference(logits, combine_weights=combine, capacity=C, **kw), want)


@pytest.mark.parametrize("router,combine,T,E,skew,impl", [
    ("mohge", "softmax", 128, 64, None, "wgmma"),    # MoHGE-3B's router, two chunks of 64
    ("mohge", "renormalize", 64, 128, 77, "wgmma"),  # 16 experts a group; 77 overflows C
    ("moe", "raw", 192, 64, None, "wgmma"),          # top-K over one group, three chunks
    ("moe", "softmax", 128, 64, 5, "wgmma"),
    ("mohge", "softmax", 256, 64, None, "rows"),     # two warpgroups of 128 tokens
    ("mohge", "renormalize", 64, 64, 9, "rows"),     # padded to 128 tokens; 9 overflows C
    ("moe", "raw", 192, 64, None, "rows"),           # padded to 256
    ("moe", "softmax", 128, 64, 5, "rows"),
    ("mohge", "softmax", 256, 64, None, "triton"),   # 64 programs of 4 tokens
    ("mohge", "renormalize", 50, 128, 77, "triton"), # padded to 64; 77 overflows C
    ("moe", "raw", 300, 64, None, "triton"),         # 19 programs: counts' rows padded to 32
    ("moe", "softmax", 128, 64, 5, "triton")])
def test_kernel_in_the_gpu_interpreter_matches_numpy(rng, router, combine, T, E, skew, impl):
  """Ranks carried across chunks (each warpgroup's first token counts the earlier chunks'
  pairs), overflow found (and the clipped slots as the reference clips them); impl="rows"
  pads the tokens to a multiple of 128 without counting the padding's choices, "triton"
  (Pallas' Triton interpreter) to a multiple of its tile's tokens, each program's ranks
  continued from the earlier programs' counts by the second launch."""
  kw = dict(MOHGE if router == "mohge" else MOE)
  G = kw["num_groups"]
  C = 64 if skew is None else 32
  logits = _logits(rng, T, G, E, skew)
  want = _numpy_route(logits, G, kw["top_k_groups"], kw["top_k"], combine, C)
  assert want[4] == (skew is not None)
  got = rg.route_slots(logits, combine_weights=combine, capacity=C, interpret=True,
                       impl=impl, **kw)
  _check(got, want)


@pytest.mark.parametrize("min_tokens", [8, 16])
def test_triton_larger_tiles_route_alike(rng, monkeypatch, min_tokens):
  """The Triton kernels with more tokens a program (route_gpu.MIN_TILE_TOKENS: 8 tokens
  and 2 warps, 16 and 4; the default's 4 and 1 above) in the interpreter: the same routing,
  slots, slot tokens, counts and slot rows as the default tile, and numpy's; ragged T."""
  x_kw = dict(combine_weights="softmax", capacity=64, interpret=True, impl="triton", **MOHGE)
  for T in (256, 90):
    logits = _logits(rng, T, 8, 64)
    x = jnp.asarray(rng.normal(size=(T, 128)), jnp.bfloat16)
    want = rg.route_slots(logits, x=x, **x_kw)
    with monkeypatch.context() as m:
      m.setattr(rg, "MIN_TILE_TOKENS", min_tokens)
      assert rg.triton_tile(T) == (min_tokens, min_tokens // 4)
      got = rg.route_slots(logits, x=x, **x_kw)
    for name in ("expert_ids", "group_ids", "slots", "overflow", "slot_tokens", "counts"):
      np.testing.assert_array_equal(np.asarray(getattr(got, name)),
                                    np.asarray(getattr(want, name)), err_msg=name)
    # the filled slot rows (the others are never written: the kernels' padding)
    filled = (np.arange(64)[None, :] < np.asarray(want.counts)[:, None]).ravel()   # [E * C]
    np.testing.assert_array_equal(np.asarray(got.slot_x)[filled],
                                  np.asarray(want.slot_x)[filled])
    assert filled.sum() == T * MOHGE["top_k"]
    # (a row's sums may run in another order in another tile's layout)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6)
    _check(got, _numpy_route(logits, 8, MOHGE["top_k_groups"], MOHGE["top_k"], "softmax", 64))


def test_kernel_lowers_for_cuda_and_refuses_other_shapes():
  for kw, E, impl in ((MOHGE, 64, "wgmma"), (MOE, 128, "wgmma"), (MOHGE, 64, "rows"),
                      (MOE, 64, "rows")):
    G = kw["num_groups"]
    text = jax.jit(lambda x, kw=kw, impl=impl: rg.route_slots(
        x, combine_weights="softmax", capacity=64, impl=impl, **kw)).trace(
            jax.ShapeDtypeStruct((256, G + E), jnp.float32)).lower(
                lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
  with pytest.raises(ValueError, match="impl='rows'.*experts must be 64"):
    rg.route_slots(jnp.zeros((128, 128)), combine_weights="softmax", capacity=64,
                   impl="rows", **MOE)
  with pytest.raises(ValueError, match="impl='lanes'"):
    rg.route_slots(jnp.zeros((128, 72)), combine_weights="softmax", capacity=64,
                   impl="lanes", **MOHGE)
  for T, E, kw, match in ((100, 64, MOHGE, "multiple of 64 up to 256"),
                          (320, 64, MOHGE, "multiple of 64 up to 256"),
                          (128, 96, MOE, "experts must be 64 or 128"),
                          (128, 64, dict(MOE, top_k=9), "top_k must be"),
                          (128, 64, dict(MOHGE, num_groups=4), "needs 8 groups")):
    with pytest.raises(ValueError, match=match):
      rg.route_slots(jnp.zeros((T, kw["num_groups"] + E)), combine_weights="softmax",
                     capacity=64, **kw)
  with pytest.raises(ValueError, match="combine_weights='max'"):
    rg.route_slots(jnp.zeros((64, 72)), combine_weights="max", capacity=64, **MOHGE)


def test_triton_kernel_copies_the_tokens_rows_to_their_slots(rng):
  """impl="triton" with x: every pair's slot row of `slot_x` is its token's row of x
  (a ragged number of tokens; the interpreter); x with another impl is refused."""
  T, C = 100, 64
  logits = _logits(rng, T, 8, 64)
  x = jnp.asarray(rng.normal(size=(T, 256)), jnp.bfloat16)
  got = rg.route_slots(logits, combine_weights="softmax", capacity=C, interpret=True,
                       impl="triton", x=x, **MOHGE)
  assert got.slot_x.shape == (64 * C, 256) and not bool(got.overflow)
  slots = np.asarray(got.slots)
  np.testing.assert_array_equal(np.asarray(got.slot_x)[slots],
                                np.broadcast_to(np.asarray(x)[:, None], (T, 6, 256)))
  with pytest.raises(ValueError, match="x goes with impl='triton'"):
    rg.route_slots(logits, combine_weights="softmax", capacity=C, impl="wgmma", x=x, **MOHGE)


def test_triton_kernels_lower_for_cuda_and_refuse_other_shapes():
  """impl="triton": both launches lower for CUDA (Pallas' Triton lowering asks for the
  GPU's compute capability: an H100's is given), at a decode batch and at a ragged one;
  shapes it cannot take are refused by name."""
  from unittest import mock
  from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg

  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion("NVIDIA H100"))
  for kw, E, T in ((MOHGE, 64, 256), (MOE, 128, 1000)):
    G = kw["num_groups"]
    with mock.patch.object(reg.gpu_info_lib, "get_gpu_info", lambda: info):
      text = jax.jit(lambda lg, x, kw=kw: rg.route_slots(
          lg, combine_weights="softmax", capacity=64, impl="triton", x=x, **kw)).trace(
              jax.ShapeDtypeStruct((T, G + E), jnp.float32),
              jax.ShapeDtypeStruct((T, 1024), jnp.bfloat16)).lower(
                  lowering_platforms=("cuda",)).as_text()
    assert text.count("route_tokens") and text.count("route_slots")
  for T, E, kw, match in ((1025, 64, MOE, "tokens must be 1..1024"),
                          (64, 96, MOE, "experts must be a power of two"),
                          (64, 64, dict(MOE, top_k=9), "top_k must be 1..8"),
                          (64, 64, dict(MOHGE, num_groups=6), "power-of-two number of groups"),
                          (64, 64, dict(MOHGE, num_groups=4, top_k_groups=5), "top_k_groups=5")):
    with pytest.raises(ValueError, match=match):
      rg.route_slots(jnp.zeros((T, kw["num_groups"] + E)), combine_weights="softmax",
                     capacity=64, impl="triton", **kw)


def _layer(rng, kind):
  if kind == "mohge":   # 8 groups of 8 experts, widths multiples of the kernels' 128
    router = ["model.group_widths=[128,256,384,512,640,768,896,1024]",
              "model.experts_per_group=8", "model.top_k_groups=3", "model.top_k=5"]
  else:                 # one group of 64
    router = ["model.group_widths=[128]", "model.experts_per_group=64", "model.top_k=6"]
  cfg = load_config(None, router + [
      f"model.ffn={kind}", "model.d_model=128", "model.num_shared_experts=1",
      "model.shared_expert_width=128", "model.dtype=bfloat16"])
  layer = RoutedFFN(cfg, kind, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  for w in (layer.expert_router, *([layer.group_router] if kind == "mohge" else [])):
    w[...] = w[...] * 40.0     # spread the router's scores (no near-ties)
  return cfg, layer


# Each kernel through the layer once, MoHGE's two-level router with the Triton one (whose
# outputs also replace capacity_experts' scatter and gather): the layer's plumbing (the
# logits' layout, the outputs into capacity_experts) is otherwise the same for all, each
# checked on both routers above. The MoHGE layer's interpreted slot kernels take ~16 s.
@pytest.mark.parametrize("kind,route", [("mohge", "kernel_triton"), ("moe", "kernel"),
                                        ("moe", "kernel_rows")])
def test_layer_decodes_the_same_with_the_route_kernel(rng, kind, route):
  """RoutedFFN at decode (backend="capacity", stacked experts in the interpreter): the
  routing kernel's path equals route() + capacity_experts (stacked.route="xla"): the same
  experts and groups, the same output."""
  # (bn_up 128: half the interpreted up projection's programs, 31 -> 19 s here; the tiles
  # are the expert kernels' tests' matter)
  _layer_route_equals_xla(rng, kind, route, 64, dict(bm=64, bn_up=128, interpret=True))


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("kind", ["mohge", "moe"])
@pytest.mark.parametrize("min_tokens", [4, 16])
def test_layer_decodes_the_same_with_the_triton_route_on_the_gpu(rng, monkeypatch, kind,
                                                                  min_tokens):
  """The same on the device at a decode batch of 256 tokens, route="kernel_triton" (its
  slot rows and tokens into the slot kernels) against XLA's routing; with the default tile
  (4 tokens a program, route_gpu.MIN_TILE_TOKENS) and the earlier default's 16."""
  monkeypatch.setattr(rg, "MIN_TILE_TOKENS", min_tokens)
  _layer_route_equals_xla(rng, kind, "kernel_triton", 256, {})


def _primitives(jaxpr) -> set[str]:
  """The primitives of a jaxpr and of the jitted functions it calls (not inside kernels)."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    if eqn.primitive.name in ("jit", "pjit"):
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        names |= _primitives(sub)
  return names


def _dropless(rng, T, skew, interpret):
  """capacity_experts through the Triton route's slot block of C = T rounded up to 64 rows
  an expert (dropless) and the slot kernels' passes, against float64 per pair: MoHGE's
  router (8 groups of 8 experts, widths 128 x 8), expert `skew` chosen by every token
  (T > 64 pairs: two or more row tiles) or none."""
  from tests.test_dispatch import _pairs_reference
  G, N, D, K = 8, 8, 128, MOHGE["top_k"]
  logits = _logits(rng, T, G, G * N, skew)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.bfloat16)
  wgu = [jnp.asarray(rng.normal(size=(N, D, 256)) / 12, jnp.bfloat16) for _ in range(G)]
  wd = [jnp.asarray(rng.normal(size=(N, 128, D)) / 12, jnp.bfloat16) for _ in range(G)]
  stacked = dispatch.stack_experts(wgu, wd, **({"interpret": True, "bn_up": 128}
                                               if interpret else {}))
  assert stacked.dropless
  C = dispatch.slot_capacity(T, K, G * N, stacked, dropless=True)
  assert C == -(-T // 64) * 64

  def run(logits, x, stacked):
    r = rg.route_slots(logits, combine_weights="softmax", capacity=C, interpret=interpret,
                       impl="triton", x=x, **MOHGE)
    y = dispatch.capacity_experts(x, r.expert_ids, r.weights, wgu, wd, stacked=stacked,
                                  slots=r)
    return y, r
  y, r = jax.jit(run)(logits, x, stacked)
  ids = np.asarray(r.expert_ids)
  counts = np.bincount(ids.ravel(), minlength=G * N)
  assert int(r.max_count[0]) == counts.max() and not bool(r.overflow)
  assert (counts.max() > 64) == (skew is not None)
  # no cond around the kernels (the interpreter's kernels hold conds of their own: not looked in)
  assert "cond" not in _primitives(jax.make_jaxpr(run)(logits, x, stacked).jaxpr)
  want = _pairs_reference(np.asarray(x, np.float64), ids, np.asarray(r.weights, np.float64),
                          [np.asarray(a, np.float64) for a in wgu],
                          [np.asarray(a, np.float64) for a in wd])
  np.testing.assert_allclose(np.asarray(y), want, rtol=0.03, atol=0.03 * np.abs(want).max())
  # the same with C from capacity_factor and the cond to all_experts (overflow="cond")
  cond = dispatch.stack_experts(wgu, wd, overflow="cond", **({"interpret": True, "bn_up": 128}
                                                              if interpret else {}))
  assert not cond.dropless
  Cc = dispatch.slot_capacity(T, K, G * N, cond)
  r2 = rg.route_slots(logits, combine_weights="softmax", capacity=Cc, interpret=interpret,
                      impl="triton", x=x, **MOHGE)
  y2 = jax.jit(lambda x, s: dispatch.capacity_experts(x, r2.expert_ids, r2.weights, wgu, wd,
                                                      stacked=s, slots=r2))(x, cond)
  np.testing.assert_allclose(np.asarray(y2), want, rtol=0.03, atol=0.03 * np.abs(want).max())
  with pytest.raises(ValueError, match="overflow='drop'"):
    dispatch.stack_experts(wgu, wd, overflow="drop")


@pytest.mark.parametrize("T,skew", [(96, 5), (1, None)])
def test_dropless_slot_block_runs_the_row_tiles_the_fullest_expert_fills(rng, T, skew):
  """The interpreter: with expert 5 in every token's top-K (96 pairs: two passes of the
  slot kernels over a C = 128 block) and one token (one pass, C = 64: the route's tile
  padded from 1 token to 4)."""
  _dropless(rng, T, skew, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("T,skew", [(256, 5), (256, None), (200, 9)])
def test_dropless_slot_block_on_the_gpu(rng, T, skew):
  """The same compiled for the H200 at decode's batch: 256 pairs of expert 5 (four passes
  over C = 256), no skew (one pass), a ragged batch of 200 (C = 256)."""
  _dropless(rng, T, skew, interpret=False)


def _sparse(rng, monkeypatch, T, interpret):
  """stack_experts (sparse=1, the default) at T tokens (T * K < E): capacity_experts
  through the Triton route's slot block runs the chosen experts only (`slot_gmm_active`,
  called once a projection; the listed experts from the token's ids at T = 1, from the
  counts above), against float64 per pair; experts of four widths (8 groups of 8)."""
  from pallas_kernels import slot_gpu
  from tests.test_dispatch import _pairs_reference
  G, N, D, K = 8, 8, 128, MOHGE["top_k"]
  widths = (128, 256, 128, 384, 128, 256, 512, 128)
  logits = _logits(rng, T, G, G * N)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.bfloat16)
  wgu = [jnp.asarray(rng.normal(size=(N, D, 2 * w)) / 12, jnp.bfloat16) for w in widths]
  wd = [jnp.asarray(rng.normal(size=(N, w, D)) / 12, jnp.bfloat16) for w in widths]
  kw = {"interpret": True} if interpret else {}
  stacked = dispatch.stack_experts(wgu, wd, **kw)   # sparse=1: DECODE_KERNEL_TUNING's
  assert stacked.sparse and not dispatch.stack_experts(wgu, wd, sparse=0, **kw).sparse
  calls = []
  real = slot_gpu.slot_gmm_active
  monkeypatch.setattr(slot_gpu, "slot_gmm_active",
                      lambda *a, **k: calls.append(a[2].shape) or real(*a, **k))
  C = dispatch.slot_capacity(T, K, G * N, stacked, dropless=True)
  r = rg.route_slots(logits, combine_weights="softmax", capacity=C, interpret=interpret,
                     impl="triton", x=x, **MOHGE)
  y = jax.jit(lambda x, s: dispatch.capacity_experts(x, r.expert_ids, r.weights, wgu, wd,
                                                     stacked=s, slots=r))(x, stacked)
  assert calls == [(T * K,), (T * K,)]   # the up and the down projection, T * K listed
  want = _pairs_reference(np.asarray(x, np.float64), np.asarray(r.expert_ids),
                          np.asarray(r.weights, np.float64),
                          [np.asarray(a, np.float64) for a in wgu],
                          [np.asarray(a, np.float64) for a in wd])
  np.testing.assert_allclose(np.asarray(y), want, rtol=0.03, atol=0.03 * np.abs(want).max())
  with pytest.raises(ValueError, match="sparse=2: must be 0 or 1"):
    dispatch.stack_experts(wgu, wd, sparse=2, **kw)


@pytest.mark.parametrize("T", [1, 3])
def test_sparse_decode_runs_the_chosen_experts_only(rng, monkeypatch, T):
  """The interpreter: one token (its 6 experts) and three (up to 18, duplicates merged)."""
  _sparse(rng, monkeypatch, T, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("T", [1, 5, 10])
def test_sparse_decode_on_the_gpu(rng, monkeypatch, T):
  """The same compiled for the H200 (10 tokens: 60 pairs, nearly every expert)."""
  _sparse(rng, monkeypatch, T, interpret=False)


def _layer_route_equals_xla(rng, kind, route, T, kw):
  cfg, layer = _layer(rng, kind)
  x = jnp.asarray(rng.normal(size=(2, T // 2, 128)), jnp.bfloat16)
  w = lambda ws: [a[...].astype(jnp.bfloat16) for a in ws]  # noqa: E731
  # the kernel's stack with the router's operand made once (the decode step's), XLA's
  # routing from the layer's weights
  stacks = {r: dispatch.stack_experts(w(layer.w_gate_up), w(layer.w_down),
                                      layer.router_weights() if r == route else None,
                                      route=r, **kw)
            for r in (route, "xla")}
  assert stacks[route].router.shape == (128, 3 * (64 + (8 if kind == "mohge" else 0)))
  out = {r: layer(x, backend="capacity", stacked=s) for r, s in stacks.items()}
  y_k, aux_k = out[route]
  y_x, aux_x = out["xla"]
  assert "group_aux" not in aux_k and "group_aux" in aux_x   # the kernel path ran
  np.testing.assert_array_equal(np.asarray(aux_k["expert_ids"]), np.asarray(aux_x["expert_ids"]))
  np.testing.assert_array_equal(np.asarray(aux_k["group_ids"]), np.asarray(aux_x["group_ids"]))
  # The combine weights agree to float32 rounding (another order of operations), so a
  # bf16 output may round the other way: a few elements differ, by at most a bf16 step
  # of the largest output.
  y_k, y_x = np.asarray(y_k, np.float32), np.asarray(y_x, np.float32)
  diff = np.abs(y_k - y_x).max() / np.abs(y_x).max()
  assert diff <= 2.0 ** -8  # a bf16 step of the largest output (measured: 0 to 1/700 of it)
  assert np.mean(y_k != y_x) < 0.01
  with pytest.raises(ValueError, match="route='fast'"):
    dispatch.stack_experts(w(layer.w_gate_up), w(layer.w_down), route="fast", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("impl", rg.IMPLS)
@pytest.mark.parametrize("router,T,skew", [("mohge", 256, None), ("mohge", 128, 9),
                                           ("moe", 256, None)])
def test_kernel_matches_numpy_on_the_gpu(rng, router, T, skew, impl):
  kw = MOHGE if router == "mohge" else MOE
  G = kw["num_groups"]
  logits = _logits(rng, T, G, 64, skew)
  want = _numpy_route(logits, G, kw["top_k_groups"], kw["top_k"], "softmax", 64)
  _check(rg.route_slots(logits, combine_weights="softmax", capacity=64, impl=impl, **kw),
         want)   # (with impl="triton" also its slots' tokens and counts)
