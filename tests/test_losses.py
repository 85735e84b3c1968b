"""Every loss against a float64 numpy transcription of spec §3."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from mohge_jax import losses, routing
from test_routing import np_two_level, softmax, top_k_stable


def np_counts(ids, num):
  return np.bincount(ids.reshape(-1), minlength=num).astype(np.float64)


def test_group_wise_aux_loss(rng):
  T, G, N, Kg, K = 83, 8, 4, 3, 5
  widths = [384, 512, 640, 768, 896, 1024, 1152, 1280]
  u = rng.normal(size=(T, G)).astype(np.float32)
  v = rng.normal(size=(T, G * N)).astype(np.float32)
  r = routing.two_level_route(jnp.asarray(u), jnp.asarray(v), num_groups=G, top_k_groups=Kg,
                              top_k=K)
  coef, delta = 1e-2, 1024.0
  got = losses.group_wise_aux_loss(r.group_softmax, r.group_ids, widths=widths, delta=delta,
                                   coef=coef)
  ref = np_two_level(u, v, G, Kg, K, "softmax")
  w = (np.array(widths) - min(widths) + delta) / delta
  np.testing.assert_allclose(w, [1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875])
  c = np_counts(ref["group_ids"], G)
  want = coef * G * np.sum(w * softmax(u.astype(np.float64)).mean(0) * c / (T * Kg))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_intra_group_aux_loss(rng):
  T, G, N, Kg, K = 71, 4, 6, 2, 7
  u = rng.normal(size=(T, G)).astype(np.float32)
  v = rng.normal(size=(T, G * N)).astype(np.float32)
  r = routing.two_level_route(jnp.asarray(u), jnp.asarray(v), num_groups=G, top_k_groups=Kg,
                              top_k=K)
  coef = 5e-3
  got = losses.intra_group_aux_loss(r.expert_probs, r.expert_ids, experts_per_group=N,
                                    top_k_groups=Kg, coef=coef)
  ref = np_two_level(u, v, G, Kg, K, "softmax")
  c = np_counts(ref["expert_ids"], G * N)
  want = coef * (N * Kg) * np.sum(ref["expert_probs"].mean(0) * c / (T * K))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_switch_loss(rng):
  T, E, K = 64, 16, 2
  logits = rng.normal(size=(T, E)).astype(np.float32)
  r = routing.topk_route(jnp.asarray(logits), top_k=K)
  got = losses.switch_aux_loss(r.router_probs, r.expert_ids, coef=0.01)
  p = softmax(logits.astype(np.float64))
  ids = np.argsort(-p, axis=1, kind="stable")[:, :K]
  want = 0.01 * E * np.sum(np_counts(ids, E) / (T * K) * p.mean(0))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Perfect balance gives coef (f = P = 1/E).
  uniform = losses.switch_aux_loss(jnp.full((E, E), 1 / E), jnp.arange(E)[:, None], coef=0.01)
  np.testing.assert_allclose(float(uniform), 0.01, rtol=1e-6)


def test_z_loss(rng):
  x = rng.normal(size=(33, 12)).astype(np.float32) * 3
  m = x.astype(np.float64).max(-1)
  lse = m + np.log(np.exp(x - m[:, None]).sum(-1))
  np.testing.assert_allclose(float(losses.z_loss(jnp.asarray(x), coef=0.1)),
                             0.1 * np.mean(lse ** 2), rtol=1e-5)


def test_cross_entropy_masked(rng):
  B, L, V = 3, 11, 37
  logits = rng.normal(size=(B, L, V)).astype(np.float32) * 2
  targets = rng.integers(0, V, size=(B, L))
  mask = (rng.random((B, L)) > 0.3).astype(np.float32)
  got, n = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  lp = np.log(softmax(logits.astype(np.float64)))
  nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(got), (nll * mask).sum() / mask.sum(), rtol=1e-5)
  assert float(n) == mask.sum()


def test_aux_losses_differentiate_through_both_routers(rng):
  T, G, N, Kg, K, D = 64, 4, 4, 2, 3, 16
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  wg = jnp.asarray(rng.normal(size=(D, G)), jnp.float32)
  we = jnp.asarray(rng.normal(size=(D, G * N)), jnp.float32)

  def total(wg, we):
    r = routing.two_level_route(x @ wg, x @ we, num_groups=G, top_k_groups=Kg, top_k=K)
    return (losses.intra_group_aux_loss(r.expert_probs, r.expert_ids, experts_per_group=N,
                                        top_k_groups=Kg, coef=1.0),
            losses.group_wise_aux_loss(r.group_softmax, r.group_ids, widths=[1, 2, 3, 4],
                                       delta=1.0, coef=1.0))

  g_ig = jax.grad(lambda a, b: total(a, b)[0], argnums=(0, 1))(wg, we)
  g_gw = jax.grad(lambda a, b: total(a, b)[1], argnums=(0, 1))(wg, we)
  assert np.abs(np.asarray(g_ig[0])).sum() > 0 and np.abs(np.asarray(g_ig[1])).sum() > 0
  assert np.abs(np.asarray(g_gw[0])).sum() > 0
  np.testing.assert_array_equal(np.asarray(g_gw[1]), 0)  # L_GW does not see the expert gate


@pytest.mark.parametrize("L,chunk", [(12, 4), (13, 5), (7, 16)])
def test_chunked_cross_entropy_equals_plain(rng, L, chunk):
  B, D, V = 3, 8, 29
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  t = jnp.asarray(rng.integers(0, V, size=(B, L)))
  m = jnp.asarray(rng.random((B, L)) > 0.2, jnp.float32)
  plain = lambda x, w: losses.cross_entropy(x @ w, t, m)[0]
  chunked = lambda x, w: losses.chunked_cross_entropy(x, w, t, m, chunk=chunk)[0]
  np.testing.assert_allclose(float(chunked(x, w)), float(plain(x, w)), rtol=1e-5)
  c = float(rng.normal())  # the loss's cotangent scales the gradients made in the forward
  grads = jax.grad(lambda x, w: c * chunked(x, w), (0, 1))(x, w)
  for a, b in zip(grads, jax.grad(lambda x, w: c * plain(x, w), (0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_chunked_cross_entropy_makes_each_chunks_logits_once(rng):
  """Differentiated, each chunk runs three matmuls (logits, dx, dw): the logits are not
  recomputed in the backward pass. bf16 inputs: gradients as the plain loss's."""
  B, L, D, V, chunk = 2, 8, 16, 40, 4
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(D, V)) / 4, jnp.bfloat16)
  t = jnp.asarray(rng.integers(0, V, size=(B, L)))
  m = jnp.ones((B, L), jnp.float32)
  chunked = lambda x, w: losses.chunked_cross_entropy(x, w, t, m, chunk=chunk)[0]
  plain = lambda x, w: losses.cross_entropy(losses.logits_matmul(x, w), t, m)[0]
  for a, b in zip(jax.grad(chunked, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2e-2, atol=2e-3)

  def dots(jaxpr):
    n = 0
    for e in jaxpr.eqns:
      n += e.primitive.name == "dot_general"
      for v in e.params.values():
        if isinstance(v, jax.extend.core.ClosedJaxpr):
          n += dots(v.jaxpr) * (e.params.get("length", 1) if e.primitive.name == "scan" else 1)
    return n
  assert dots(jax.make_jaxpr(jax.grad(chunked, (0, 1)))(x, w).jaxpr) == 3 * (L // chunk)


def np_group_wise(S, gids, widths, delta, coef):
  T, G = S.shape
  w = (np.array(widths) - min(widths) + delta) / delta
  return coef * G * np.sum(w * S.mean(0) * np_counts(gids, G) / (T * gids.shape[1]))


def np_intra_group(P, eids, N, Kg, coef):
  T, E = P.shape
  return coef * (N * Kg) * np.sum(P.mean(0) * np_counts(eids, E) / (T * eids.shape[1]))


def np_switch(p, eids, coef):
  T, E = p.shape
  return coef * E * np.sum(np_counts(eids, E) / (T * eids.shape[1]) * p.mean(0))


def np_per_chunk(fn, chunk, *arrays):
  """The reference's scope: each chunk of `chunk` consecutive tokens its own loss, averaged."""
  T = arrays[0].shape[0]
  return np.mean([fn(*(a[i:i + chunk] for a in arrays)) for i in range(0, T, chunk)])


def test_aux_losses_per_chunk_of_tokens(rng):
  """loss.aux_tokens: statistics per chunk of consecutive tokens, losses averaged."""
  G, N, Kg, K, chunk = 4, 4, 2, 3, int(rng.integers(5, 40))
  T = chunk * int(rng.integers(2, 6))
  widths = [64, 96, 128, 160]
  u = rng.normal(size=(T, G)).astype(np.float32) * 2
  v = rng.normal(size=(T, G * N)).astype(np.float32) * 2
  r = routing.two_level_route(jnp.asarray(u), jnp.asarray(v), num_groups=G, top_k_groups=Kg,
                              top_k=K)
  ref = np_two_level(u, v, G, Kg, K, "softmax")
  got = losses.group_wise_aux_loss(r.group_softmax, r.group_ids, widths=widths, delta=64.0,
                                   coef=0.1, chunk=chunk)
  want = np_per_chunk(lambda s, g: np_group_wise(s, g, widths, 64.0, 0.1), chunk,
                      softmax(u.astype(np.float64)), ref["group_ids"])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  got = losses.intra_group_aux_loss(r.expert_probs, r.expert_ids, experts_per_group=N,
                                    top_k_groups=Kg, coef=0.1, chunk=chunk)
  want = np_per_chunk(lambda p, e: np_intra_group(p, e, N, Kg, 0.1), chunk,
                      ref["expert_probs"], ref["expert_ids"])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  logits = rng.normal(size=(T, 16)).astype(np.float32)
  r = routing.topk_route(jnp.asarray(logits), top_k=2)
  p = softmax(logits.astype(np.float64))
  got = losses.switch_aux_loss(r.router_probs, r.expert_ids, coef=0.1, chunk=chunk)
  want = np_per_chunk(lambda p, e: np_switch(p, e, 0.1), chunk, p, top_k_stable(p, 2))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="aux_tokens"):
    losses.switch_aux_loss(r.router_probs, r.expert_ids, coef=0.1, chunk=T - 1)


@pytest.mark.parametrize("kind", ["mohge", "moe"])
def test_layer_aux_losses_follow_loss_aux_tokens(rng, kind):
  """The routed layer's router computes the aux losses per loss.aux_tokens chunk of the
  flattened [B*L] tokens (B*L a multiple), and over everything for other sizes (inference)."""
  from flax import nnx

  from mohge_jax.config import load_config
  from mohge_jax.experts import RoutedFFN
  B, L = 4, 6
  chunk = int(rng.choice([3, 6, 12]))
  extra = (["model.ffn=moe", "model.group_widths=[16]", "model.experts_per_group=8",
            "model.top_k_groups=1"] if kind == "moe" else [])
  cfg = load_config("configs/tiny.yaml", ["model.d_model=16", "model.init_std=0.3",
                                          "loss.expert_aux_coef=0.1", "loss.group_aux_coef=0.1",
                                          f"train.batch_size={B}", f"train.seq_len={L}",
                                          f"loss.aux_tokens={chunk}"] + extra)
  m = cfg.model
  layer = RoutedFFN(cfg, kind, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  route = nnx.jit(lambda layer, x_TxD: layer.route(x_TxD))
  for shape, scope in (((B, L), chunk), ((1, 5), 5)):
    x = jnp.asarray(rng.normal(size=(*shape, m.d_model)), jnp.float32)
    r, aux = route(layer, x.reshape(-1, m.d_model))  # what layer(x) does with [B, L, D]
    f64 = lambda a: np.asarray(a, np.float64)
    if kind == "mohge":
      want_g = np_per_chunk(lambda s, g: np_group_wise(s, g, m.group_widths, 64.0, 0.1), scope,
                            f64(r.group_softmax), np.asarray(r.group_ids))
      want_e = np_per_chunk(lambda p, e: np_intra_group(p, e, m.experts_per_group,
                                                        m.top_k_groups, 0.1),
                            scope, f64(r.expert_probs), np.asarray(r.expert_ids))
      np.testing.assert_allclose(float(aux["group_aux"]), want_g, rtol=1e-5)
    else:
      want_e = np_per_chunk(lambda p, e: np_switch(p, e, 0.1), scope, f64(r.router_probs),
                            np.asarray(r.expert_ids))
    np.testing.assert_allclose(float(aux["expert_aux"]), want_e, rtol=1e-5)


def test_logits_matmul_backward_runs_in_the_input_dtype(rng):
  """float32 input: the gradients of a plain dot. bf16 input: the float32 logit gradient is
  rounded to bf16 and both backward matmuls take bf16 operands (no float32 x bf16 matmul,
  which GPUs run far slower), accumulated in float32."""
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 40)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 3, 40)), jnp.float32)
  f = lambda x, w: jnp.sum(losses.logits_matmul(x, w) * g)
  plain = lambda x, w: jnp.sum(jnp.dot(x, w) * g)
  for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  out = losses.logits_matmul(x16, w16)
  assert out.dtype == jnp.float32
  dx, dw = jax.grad(f, (0, 1))(x16, w16)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  g16 = np.asarray(g.astype(jnp.bfloat16), np.float64)
  x64, w64 = np.asarray(x16, np.float64), np.asarray(w16, np.float64)
  np.testing.assert_allclose(np.asarray(dx, np.float64), np.einsum("blv,dv->bld", g16, w64),
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum("bld,blv->dv", x64, g16),
                             rtol=1e-2, atol=1e-2)
  jaxpr = jax.make_jaxpr(jax.grad(f, (0, 1)))(x16, w16).jaxpr
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 2  # dx and dw (the forward dot sits inside the custom_vjp call)
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
