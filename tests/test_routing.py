"""Routing against a float64 numpy transcription of the spec (§2)."""

import jax.numpy as jnp
import numpy as np
import pytest

from mohge_jax import routing


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def top_k_stable(x, k):
  """Largest k per row, ties to the lower index."""
  return np.argsort(-x, axis=-1, kind="stable")[:, :k]


def np_combine(r_sel, mode):
  return {"softmax": lambda r: softmax(r),
          "renormalize": lambda r: r / r.sum(-1, keepdims=True),
          "raw": lambda r: r}[mode](r_sel)


def np_two_level(u, v, G, Kg, K, mode):
  u, v = u.astype(np.float64), v.astype(np.float64)
  T, E = v.shape
  N = E // G
  s = 1 / (1 + np.exp(-u))
  gids = top_k_stable(s, Kg)
  sel = np.zeros_like(s)
  np.put_along_axis(sel, gids, 1.0, axis=1)
  p = s * sel / (s * sel).sum(-1, keepdims=True)
  q = softmax(v.reshape(T, G, N))
  r = (p[:, :, None] * q).reshape(T, E)
  r = r / r.sum(-1, keepdims=True)
  eids = top_k_stable(r, K)
  w = np_combine(np.take_along_axis(r, eids, 1), mode)
  P = np.zeros_like(r)
  np.put_along_axis(P, eids, w, axis=1)
  return dict(expert_ids=eids, weights=w, group_ids=gids, group_probs=p,
              group_softmax=softmax(u), expert_probs=P, router_probs=r)


IMPLS = pytest.mark.parametrize("impl", routing.TOP_K_IMPLS)


@IMPLS
@pytest.mark.parametrize("mode", ["softmax", "renormalize", "raw"])
@pytest.mark.parametrize("G,N,Kg,K", [(8, 8, 4, 6), (4, 4, 2, 8), (3, 5, 3, 7), (2, 2, 1, 2)])
def test_two_level_matches_numpy(rng, mode, G, N, Kg, K, impl):
  T = 97
  u = rng.normal(size=(T, G)).astype(np.float32) * 2
  v = rng.normal(size=(T, G * N)).astype(np.float32) * 2
  got = routing.two_level_route(jnp.asarray(u), jnp.asarray(v), num_groups=G,
                                top_k_groups=Kg, top_k=K, combine_weights=mode,
                                top_k_impl=impl)
  want = np_two_level(u, v, G, Kg, K, mode)
  np.testing.assert_array_equal(np.asarray(got.group_ids), want["group_ids"])
  np.testing.assert_array_equal(np.asarray(got.expert_ids), want["expert_ids"])
  for name in ("weights", "group_probs", "group_softmax", "expert_probs", "router_probs"):
    np.testing.assert_allclose(np.asarray(getattr(got, name)), want[name], rtol=2e-5,
                               atol=1e-6, err_msg=name)
  assert got.expert_ids.dtype == jnp.int32 and got.weights.dtype == jnp.float32
  _check_chosen(got, G * N, impl)
  # Chosen experts lie in chosen groups; K > N forces several groups per token.
  chosen_group_TxK = np.asarray(got.expert_ids) // N
  assert (chosen_group_TxK[:, :, None] == np.asarray(got.group_ids)[:, None, :]).any(-1).all()
  if K > N:
    assert np.all([len(set(row)) > 1 for row in np.asarray(got.expert_ids) // N])


def _check_chosen(r: routing.Routing, E: int, impl: str):
  """Routing.chosen: the one-hot of expert_ids summed over K, [T, E] bool, where the
  selection computes it (impl "rank"), else None."""
  if impl != "rank":
    assert r.chosen is None
    return
  ids = np.asarray(r.expert_ids)
  want = np.zeros((ids.shape[0], E), bool)
  np.put_along_axis(want, ids, True, axis=1)
  assert r.chosen.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(r.chosen), want)


@IMPLS
def test_ties_go_to_lower_index(impl):
  # Equal group logits in every row, and every group's expert logits identical: all
  # scores tie exactly, so the lowest group and expert indices must win.
  T, G, N, Kg, K = 5, 4, 3, 2, 4
  u = np.zeros((T, G), np.float32)
  v = np.tile(np.array([0.5, 0.5, 0.1], np.float32), (T, G))
  got = routing.two_level_route(jnp.asarray(u), jnp.asarray(v), num_groups=G,
                                top_k_groups=Kg, top_k=K, top_k_impl=impl)
  np.testing.assert_array_equal(np.asarray(got.group_ids), np.tile([0, 1], (T, 1)))
  # r: groups 0 and 1 equal; experts 0,1 tie (0.5) above expert 2 -> ids 0,1,3,4.
  np.testing.assert_array_equal(np.asarray(got.expert_ids), np.tile([0, 1, 3, 4], (T, 1)))
  _check_chosen(got, G * N, impl)


@IMPLS
def test_near_ties_resolved_by_value(rng, impl):
  T, G, N = 64, 4, 4
  base = rng.normal(size=(T, 1)).astype(np.float32)
  eps = np.float32(1e-3)
  # Group 3 beats group 0 by a hair; groups 1, 2 far below.
  u = np.concatenate([base, base - 5, base - 5, base + eps], axis=1)
  v = rng.normal(size=(T, G * N)).astype(np.float32)
  got = routing.two_level_route(jnp.asarray(u), jnp.asarray(v), num_groups=G,
                                top_k_groups=1, top_k=2, top_k_impl=impl)
  np.testing.assert_array_equal(np.asarray(got.group_ids)[:, 0], 3)
  want = np_two_level(u, v, G, 1, 2, "softmax")
  np.testing.assert_array_equal(np.asarray(got.expert_ids), want["expert_ids"])


@IMPLS
@pytest.mark.parametrize("mode", ["softmax", "renormalize", "raw"])
def test_topk_route_matches_numpy(rng, mode, impl):
  T, E, K = 50, 16, 4
  logits = rng.normal(size=(T, E)).astype(np.float32)
  got = routing.topk_route(jnp.asarray(logits), top_k=K, combine_weights=mode,
                           top_k_impl=impl)
  probs = softmax(logits.astype(np.float64))
  ids = top_k_stable(probs, K)
  np.testing.assert_array_equal(np.asarray(got.expert_ids), ids)
  np.testing.assert_allclose(np.asarray(got.weights),
                             np_combine(np.take_along_axis(probs, ids, 1), mode), rtol=2e-5)
  np.testing.assert_allclose(np.asarray(got.router_probs), probs, rtol=2e-5, atol=1e-7)
  _check_chosen(got, E, impl)


def test_one_group_equals_topk_softmax(rng):
  T, N, K = 40, 8, 3
  v = rng.normal(size=(T, N)).astype(np.float32)
  u = rng.normal(size=(T, 1)).astype(np.float32)
  two = routing.two_level_route(jnp.asarray(u), jnp.asarray(v), num_groups=1, top_k_groups=1,
                                top_k=K, combine_weights="renormalize")
  one = routing.topk_route(jnp.asarray(v), top_k=K, combine_weights="renormalize")
  np.testing.assert_array_equal(np.asarray(two.expert_ids), np.asarray(one.expert_ids))
  np.testing.assert_allclose(np.asarray(two.weights), np.asarray(one.weights), rtol=1e-6)


@pytest.mark.parametrize("N,k", [(8, 4), (64, 6), (5, 5)])
def test_select_top_k_by_rank_equals_lax_top_k(rng, N, k):
  """select_top_k(impl="rank") against lax.top_k: the same values and indices on rows with
  many exact ties (values from a few levels, zeros among them) and on distinct values,
  with leading axes; the values' gradient is the same selection."""
  import jax
  levels = rng.normal(size=4).astype(np.float32)
  tied = np.concatenate([levels, [0.0]]).astype(np.float32)[rng.integers(0, 5, (3, 40, N))]
  plain = rng.normal(size=(3, 40, N)).astype(np.float32)
  for x in (jnp.asarray(tied), jnp.asarray(plain)):
    want_v, want_i = jax.lax.top_k(x, k)
    got_v, got_i = routing.select_top_k(x, k, "rank")
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    assert got_i.dtype == jnp.int32
  w = jnp.asarray(rng.normal(size=(3, 40, k)), jnp.float32)
  grad = lambda impl: jax.grad(  # noqa: E731
      lambda a: jnp.sum(routing.select_top_k(a, k, impl)[0] * w))(jnp.asarray(plain))
  np.testing.assert_array_equal(np.asarray(grad("rank")), np.asarray(grad("sort")))
  with pytest.raises(ValueError, match="impl='heap'"):
    routing.select_top_k(jnp.asarray(plain), k, "heap")


def test_bad_arguments():
  with pytest.raises(ValueError, match="top_k"):
    routing.two_level_route(jnp.zeros((2, 4)), jnp.zeros((2, 8)), num_groups=4,
                            top_k_groups=2, top_k=5)
  with pytest.raises(ValueError, match="num_groups"):
    routing.two_level_route(jnp.zeros((2, 4)), jnp.zeros((2, 8)), num_groups=3,
                            top_k_groups=2, top_k=1)
  with pytest.raises(ValueError, match="combine_weights"):
    routing.combine(jnp.ones((2, 2)), "max")


@pytest.mark.parametrize("name", ["moe_3b", "moe_small"])
def test_moe_configs_combine_like_megatrons_topk_router(rng, name):
  """Megatron's TopKRouter without pre-softmax: weights = softmax over the top-K logits
  (they sum to 1), through the config's RoutedFFN (shrunk in width, not in experts)."""
  from flax import nnx

  from mohge_jax.config import load_config
  from mohge_jax.experts import RoutedFFN
  cfg = load_config(f"configs/{name}.yaml", ["model.d_model=16", "model.group_widths=[8]",
                                             "model.shared_expert_width=8"])
  m = cfg.model
  layer = RoutedFFN(cfg, "moe", rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = rng.normal(size=(50, m.d_model)).astype(np.float32) * 30
  r, _ = layer.route(jnp.asarray(x))
  logits = x.astype(np.float64) @ np.asarray(layer.expert_router[...], np.float64)
  ids = top_k_stable(logits, m.top_k)
  want = softmax(np.take_along_axis(logits, ids, 1))
  np.testing.assert_array_equal(np.asarray(r.expert_ids), ids)
  np.testing.assert_allclose(np.asarray(r.weights), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(r.weights).sum(-1), 1.0, rtol=1e-5)
