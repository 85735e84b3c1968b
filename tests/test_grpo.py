"""GRPO: advantages and the objective against numpy (each V3.2 refinement on and off),
keep sampling mask (the sampler's own log-probs come back: ratio 1), keep routing (the
recorded experts are used whatever the router now says, and the router keeps a gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mohge_jax import generate as gen
from mohge_jax import grpo, routing
from mohge_jax.config import load_config
from mohge_jax.experts import RoutedFFN
from tests.test_generate import ROOT, TINY, make_model, ragged


def test_group_advantages(rng):
  r = rng.standard_normal((3, 5)).astype(np.float32)
  r[2] = 1.0  # all equal: zero advantage
  want = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
  got = np.asarray(grpo.group_advantages(jnp.asarray(r)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[2] == 0)


def loss_reference(logp, old, ref, A, mask, eps, beta, unbiased, delta):
  """numpy float64, sequence by sequence."""
  total = 0.0
  for b in range(len(A)):
    m = mask[b]
    lp, lo, lr = logp[b, m], old[b, m], ref[b, m]
    rho = np.exp(lp - lo)
    pg = np.minimum(rho * A[b], np.clip(rho, 1 - eps, 1 + eps) * A[b])
    kl = np.exp(lr - lp) - (lr - lp) - 1
    if unbiased:
      kl = rho * kl
    keep = 1.0
    if delta is not None and A[b] < 0 and np.mean(lo - lp) > delta:
      keep = 0.0
    total += np.mean(keep * pg - beta * kl) if m.any() else 0.0
  return -total / len(A)


def random_inputs(rng, B=6, T=9):
  logp = -rng.uniform(0.1, 3.0, size=(B, T))
  old = logp + rng.normal(0, 0.3, size=(B, T))
  old[0] = logp[0] + 0.8  # sampling policy far more confident: off-policy
  old[1] = logp[1] + 0.8
  ref = logp + rng.normal(0, 0.5, size=(B, T))
  A = rng.standard_normal(B)
  A[0], A[1] = -1.0, 1.0  # only the negative one is masked
  mask = rng.uniform(size=(B, T)) < 0.7
  mask[:, 0] = True
  return logp, old, ref, A, mask


@pytest.mark.parametrize("unbiased,delta", [(False, None), (True, None), (True, 0.5),
                                            (False, 0.5)])
def test_objective_against_numpy(rng, unbiased, delta):
  logp, old, ref, A, mask = random_inputs(rng)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  loss, metrics = grpo.grpo_loss(f32(logp), f32(old), f32(ref), f32(A), jnp.asarray(mask),
                                 clip_eps=0.2, beta=0.05, unbiased_kl=unbiased,
                                 offpolicy_delta=delta)
  want = loss_reference(logp, old, ref, A, mask, 0.2, 0.05, unbiased, delta)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  assert float(metrics["masked_sequences"]) == (1.0 if delta is not None else 0.0)
  # The gradient (through logp) against finite differences of the reference.
  g = np.asarray(jax.grad(lambda lp: grpo.grpo_loss(
      lp, f32(old), f32(ref), f32(A), jnp.asarray(mask), clip_eps=0.2, beta=0.05,
      unbiased_kl=unbiased, offpolicy_delta=delta)[0])(f32(logp)))
  b, t = 3, 0
  h = 1e-5
  up, dn = logp.copy(), logp.copy()
  up[b, t] += h
  dn[b, t] -= h
  fd = (loss_reference(up, old, ref, A, mask, 0.2, 0.05, unbiased, delta)
        - loss_reference(dn, old, ref, A, mask, 0.2, 0.05, unbiased, delta)) / (2 * h)
  np.testing.assert_allclose(g[b, t], fd, rtol=1e-3, atol=1e-6)
  assert np.all(g[~mask] == 0)


def test_offpolicy_masking_drops_only_the_policy_term(rng):
  logp, old, ref, A, mask = random_inputs(rng)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  grad = lambda delta: np.asarray(jax.grad(lambda lp: grpo.grpo_loss(  # noqa: E731
      lp, f32(old), f32(ref), f32(A), jnp.asarray(mask), beta=0.0, clip_eps=0.9,
      offpolicy_delta=delta)[0])(f32(logp)))
  masked, free = grad(0.5), grad(None)
  assert np.all(masked[0] == 0) and np.any(free[0] != 0)  # negative A, off-policy: dropped
  np.testing.assert_allclose(masked[1:], free[1:])  # positive A: kept


def test_keep_sampling_mask_and_routing_reproduce_the_sampler(rng):
  """On-policy, the training forward with the sampler's mask and routes gives back the
  sampler's log-probs (ratio 1); without the mask it does not (top-k/top-p truncate)."""
  model = make_model(int(rng.integers(1 << 30)))
  prompts, lens = ragged(rng, [4, 2, 3], 4)
  out = gen.generate(model, prompts, lens, jax.random.key(1), max_new_tokens=5,
                     temperature=0.8, top_k=6, top_p=0.9, record_routes=True)
  batch = grpo.completion_batch(prompts, lens, out, temperature=0.8)
  logp = nnx.jit(lambda m, b: grpo.policy_logprobs(m, b))(model, batch)
  m = np.asarray(batch.loss_mask)
  assert m.sum() == 15
  np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(batch.old_logprobs)[m],
                             rtol=1e-4, atol=1e-4)
  full = nnx.jit(lambda m, b: grpo.policy_logprobs(m, b, keep_sampling_mask=False))(model, batch)
  assert np.all(np.asarray(full)[m] < np.asarray(logp)[m] + 1e-6)
  assert np.any(np.asarray(full)[m] < np.asarray(logp)[m] - 1e-3)


@pytest.mark.parametrize("kind", ["mohge", "moe"])
def test_keep_routing_forces_experts_and_router_keeps_gradient(rng, kind):
  extra = [] if kind == "mohge" else ["model.ffn=moe", "model.group_widths=[16]",
                                      "model.experts_per_group=6", "model.top_k_groups=1"]
  cfg = load_config(str(ROOT / "configs/tiny.yaml"), TINY + extra)
  layer = RoutedFFN(cfg, kind, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
  _, aux = layer(x)
  recorded = routing.Forced(aux["expert_ids"], aux["group_ids"])
  # A different router: left alone it would choose other experts.
  new = lambda w: jnp.asarray(rng.standard_normal(w.shape), jnp.float32)  # noqa: E731
  layer.expert_router[...] = new(layer.expert_router)
  if kind == "mohge":
    layer.group_router[...] = new(layer.group_router)
  _, free = layer(x)
  assert np.any(np.asarray(free["expert_ids"]) != np.asarray(recorded.expert_ids))
  _, forced = layer(x, recorded)
  np.testing.assert_array_equal(np.asarray(forced["expert_ids"]), np.asarray(recorded.expert_ids))
  # The combine weights come from the live router at the recorded ids: the router learns.
  graphdef, params = nnx.split(layer)
  c = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, recorded)[0] * c))(params)
  assert float(jnp.abs(grads["expert_router"][...]).sum()) > 0
  if kind == "mohge":
    assert float(jnp.abs(grads["group_router"][...]).sum()) > 0


def test_forced_routing_equals_free_routing_when_recorded_from_itself(rng):
  x = jnp.asarray(rng.standard_normal((2 * 8, 32)), jnp.float32)
  u, v = x[:, :3] * 3, x[:, 3:9] * 3
  free = routing.two_level_route(u, v, num_groups=3, top_k_groups=2, top_k=3)
  forced = routing.two_level_route(u, v, num_groups=3, top_k_groups=2, top_k=3,
                                   forced=routing.Forced(free.expert_ids, free.group_ids))
  for name, a, b in zip(free._fields, free, forced):
    if name == "chosen":   # the top-K mask, only where the selection computes it
      assert a is None and b is None
      continue
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, err_msg=name)
