"""The routed layer (mohge_jax.experts) against a naive per-token loop. The grouped FFN
backends and the dispatch primitives: tests/test_dispatch.py."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mohge_jax import experts, routing
from mohge_jax.config import load_config

SMALL = ["model.d_model=32", "model.group_widths=[8,16,24]", "model.experts_per_group=3",
         "model.top_k_groups=2", "model.top_k=4", "model.num_shared_experts=2",
         "model.shared_expert_width=8", "model.dtype=float32"]


def np_swiglu_expert(x, wgu, wd):
  h = x @ wgu
  gate, up = np.split(h, 2, axis=-1)
  return (gate / (1 + np.exp(-gate)) * up) @ wd


def naive_layer(layer, x_TxD):
  """Per token, per chosen expert, in float64: the reference's loop over experts."""
  r, _ = layer.route(jnp.asarray(x_TxD, jnp.float32))
  ids, w = np.asarray(r.expert_ids), np.asarray(r.weights, np.float64)
  N = layer.cfg.model.experts_per_group
  x = np.asarray(x_TxD, np.float64)
  wgu = [np.asarray(p[...], np.float64) for p in layer.w_gate_up]
  wd = [np.asarray(p[...], np.float64) for p in layer.w_down]
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(ids.shape[1]):
      g, n = divmod(int(ids[t, k]), N)
      y[t] += w[t, k] * np_swiglu_expert(x[t], wgu[g][n], wd[g][n])
  if layer.shared is not None:
    y += np_swiglu_expert(x, np.asarray(layer.shared.w_gate_up[...], np.float64),
                          np.asarray(layer.shared.w_down[...], np.float64))
  return y


@pytest.mark.parametrize("backend", ["reference", "ragged_dot", "tiled"])
@pytest.mark.parametrize("combine", ["softmax", "renormalize", "raw"])
def test_mohge_layer_equals_per_token_loop(rng, backend, combine):
  cfg = load_config(None, SMALL + [f"model.expert_backend={backend}",
                                   f"model.combine_weights={combine}", "model.init_std=0.2"])
  layer = experts.RoutedFFN(cfg, "mohge", rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x_BxLxD = rng.normal(size=(2, 19, 32)).astype(np.float32)
  y, aux = layer(jnp.asarray(x_BxLxD))
  want = naive_layer(layer, x_BxLxD.reshape(-1, 32))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), want, rtol=1e-4, atol=1e-5)
  assert float(aux["expert_tokens"].sum()) == 2 * 19 * 4
  np.testing.assert_array_equal(np.asarray(aux["group_tokens"]),
                                np.asarray(aux["expert_tokens"]).reshape(3, 3).sum(1))


@pytest.mark.parametrize("kind,extra", [
    ("mohge", []), ("moe", ["model.ffn=moe", "model.group_widths=[16]",
                            "model.experts_per_group=6", "model.top_k_groups=1"])])
@pytest.mark.parametrize("backend,B", [("all_experts", 5), ("capacity", 5), ("capacity", 64)])
def test_decode_backends_equal_per_token_loop(rng, kind, extra, backend, B):
  """The decode backends on decode-shaped input [B, 1, D] give the routed layer's value:
  "all_experts" (every token through every expert, weighted 0 where it was not routed) and
  "capacity" (fixed-capacity slots per expert; at B = 5 it is all_experts)."""
  cfg = load_config(None, SMALL + ["model.init_std=0.2", *extra])
  layer = experts.RoutedFFN(cfg, kind, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x_Bx1xD = rng.normal(size=(B, 1, 32)).astype(np.float32)
  y, _ = layer(jnp.asarray(x_Bx1xD), backend=backend)
  want = naive_layer(layer, x_Bx1xD.reshape(-1, 32))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), want, rtol=1e-4, atol=1e-5)


def test_one_group_equals_standard_topk_moe(rng):
  """G=1 (Kg=1) MoHGE routing reduces to softmax top-K: same layer output as 'moe'."""
  one_group = ["model.d_model=24", "model.group_widths=[16]", "model.experts_per_group=6",
               "model.top_k_groups=1", "model.top_k=2", "model.num_shared_experts=0",
               "model.combine_weights=renormalize", "model.init_std=0.3"]
  seed = int(rng.integers(1 << 30))
  mohge = experts.RoutedFFN(load_config(None, one_group), "mohge", rngs=nnx.Rngs(seed))
  moe = experts.RoutedFFN(load_config(None, one_group + ["model.ffn=moe"]), "moe",
                          rngs=nnx.Rngs(seed + 1))
  moe.expert_router[...] = mohge.expert_router[...]
  moe.w_gate_up[0][...] = mohge.w_gate_up[0][...]
  moe.w_down[0][...] = mohge.w_down[0][...]
  x = jnp.asarray(rng.normal(size=(3, 10, 24)), jnp.float32)
  np.testing.assert_allclose(np.asarray(mohge(x)[0]), np.asarray(moe(x)[0]), rtol=1e-5,
                             atol=1e-6)
  # ... and both equal a standard top-K MoE written out directly.
  x_TxD = np.asarray(x, np.float64).reshape(-1, 24)
  logits = x_TxD @ np.asarray(moe.expert_router[...], np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ids = np.argsort(-p, 1, kind="stable")[:, :2]
  w = np.take_along_axis(p, ids, 1)
  w /= w.sum(1, keepdims=True)
  wgu, wd = np.asarray(moe.w_gate_up[0][...], np.float64), np.asarray(moe.w_down[0][...],
                                                                       np.float64)
  want = np.stack([sum(w[t, k] * np_swiglu_expert(x_TxD[t], wgu[ids[t, k]], wd[ids[t, k]])
                       for k in range(2)) for t in range(len(x_TxD))])
  np.testing.assert_allclose(np.asarray(moe(x)[0]).reshape(-1, 24), want, rtol=1e-4, atol=1e-6)


def test_gradients_reach_both_routers_and_every_used_expert(rng):
  cfg = load_config(None, SMALL + ["model.init_std=0.2"])
  layer = experts.RoutedFFN(cfg, "mohge", rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = jnp.asarray(rng.normal(size=(4, 16, 32)), jnp.float32)

  def loss(layer):
    y, aux = layer(x)
    return jnp.mean(y ** 2) + aux["group_aux"] + aux["expert_aux"]

  grads = nnx.grad(loss)(layer)
  _, aux = layer(x)
  assert np.abs(np.asarray(grads.group_router[...])).sum() > 0
  assert np.abs(np.asarray(grads.expert_router[...])).sum() > 0
  tokens = np.asarray(aux["expert_tokens"]).reshape(3, 3)
  for g in range(3):
    for n in range(3):
      for w in (grads.w_gate_up[g], grads.w_down[g]):
        has_grad = np.abs(np.asarray(w[...][n])).sum() > 0
        assert has_grad == (tokens[g, n] > 0), (g, n, tokens[g, n])


def _dots(jaxpr):
  """Every dot_general of a jaxpr, nested ones (custom_vjp, pjit) included."""
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _dots(sub)


@pytest.mark.parametrize("kind", ["mohge", "moe"])
def test_router_logits_are_float32_products_forward_and_backward(rng, kind):
  """Every product of the router's weights (forward, and the router's gradient) is a
  float32 product: float32 operands at HIGHEST precision (not the TF32 (GPU) or bf16 (TPU)
  passes of jnp's DEFAULT), or bf16 operands (exact products) accumulated in float32; the
  logits equal float64's to float32 rounding (here bf16 activations: the weights' three bf16
  parts; a CPU computes float32 products exactly at any precision, hence the jaxpr check)."""
  shape = (["model.group_widths=[8]", "model.experts_per_group=6", "model.top_k=2"]
           if kind == "moe" else [])
  cfg = load_config(None, SMALL[:-1] + shape + [f"model.ffn={kind}", "model.dtype=bfloat16"])
  layer = experts.RoutedFFN(cfg, kind, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = jnp.asarray(rng.normal(size=(24, 32)), jnp.bfloat16)
  graphdef, state = nnx.split(layer)

  def loss(state):
    r, _ = nnx.merge(graphdef, state).route(x)
    return jnp.sum(r.weights * jnp.arange(r.weights.shape[1]))

  dots = list(_dots(jax.make_jaxpr(jax.grad(loss))(state).jaxpr))
  routers = 2 if kind == "mohge" else 1
  assert len(dots) >= 2 * routers   # each router's forward product and its gradient's
  for e in dots:
    dtypes = {v.aval.dtype for v in e.invars}
    if dtypes == {jnp.dtype(jnp.bfloat16)}:
      assert e.params["preferred_element_type"] == jnp.float32, e
    else:
      assert dtypes == {jnp.dtype(jnp.float32)}, e
      assert e.params["precision"] is not None and set(e.params["precision"]) == {
          jax.lax.Precision.HIGHEST}, e
  w = layer.expert_router[...]
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  got = routing.router_logits(x, w)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32])
def test_router_logits_and_gradients_against_float64(rng, x_dtype):
  """router_logits' value and both gradients (its custom backward for bf16 activations)
  against float64 numpy, weights of every magnitude."""
  T, D, L = 40, 64, 24
  x = jnp.asarray(rng.normal(size=(T, D)), x_dtype)
  w = jnp.asarray(rng.normal(size=(D, L)) * 10.0 ** rng.uniform(-4, 2, size=(D, L)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(T, L)), jnp.float32)
  x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, w, c))
  got = routing.router_logits(x, w)
  scale = np.abs(x64) @ np.abs(w64)  # float32 accumulation's error scale, per entry
  assert np.all(np.abs(np.asarray(got) - x64 @ w64) <= 1e-6 * scale + 1e-30)
  dx, dw = jax.grad(lambda x, w: jnp.sum(routing.router_logits(x, w) * c), (0, 1))(x, w)
  assert dx.dtype == x_dtype and dw.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dw), x64.T @ c64, rtol=1e-5,
                             atol=1e-6 * np.abs(x64.T @ c64).max())
  tol = 1e-2 if x_dtype == jnp.bfloat16 else 1e-5   # dx rounded to x's dtype
  np.testing.assert_allclose(np.asarray(dx, np.float64), c64 @ w64.T, rtol=tol,
                             atol=tol * np.abs(c64 @ w64.T).max())


@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16])
def test_router_operand_made_once_gives_the_same_logits(rng, w_dtype):
  """logits_from_operand(x, router_operand(w)) (the decode step's, the operand made once)
  equals router_logits(x, w) bit for bit: float32 weights as three bf16 parts [D, 3L],
  bf16 weights as they are [D, L]; both float32 products (float64 to float32 rounding).
  bf16 weights' gradient through router_logits is a float32 product rounded to bf16."""
  T, D, L = 40, 64, 24
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(D, L)) * 10.0 ** rng.uniform(-3, 1, size=(D, L)), w_dtype)
  op = routing.router_operand(w)
  assert op.dtype == jnp.bfloat16 and op.shape == (D, L if w_dtype == jnp.bfloat16 else 3 * L)
  got = routing.logits_from_operand(x, op, L)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(routing.router_logits(x, w)))
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  scale = np.abs(x64) @ np.abs(w64)
  assert np.all(np.abs(np.asarray(got) - x64 @ w64) <= 1e-6 * scale + 1e-30)
  with pytest.raises(ValueError, match="for 25 logits"):
    routing.logits_from_operand(x, op, L + 1)
  if w_dtype == jnp.bfloat16:
    c = jnp.asarray(rng.normal(size=(T, L)), jnp.float32)
    dw = jax.grad(lambda w: jnp.sum(routing.router_logits(x, w) * c))(w)
    assert dw.dtype == jnp.bfloat16
    want = x64.T @ np.asarray(c, np.float64)
    np.testing.assert_allclose(np.asarray(dw, np.float64), want, rtol=2 ** -8,
                               atol=1e-6 * np.abs(want).max())


def test_bf16_parts_sum_to_the_weights_exactly(rng):
  """hi + mid + lo == w for float32 w over magnitudes 1e-25..1e25 and both signs; each part
  a bf16 value."""
  w = (rng.normal(size=(4096,)) * 10.0 ** rng.uniform(-25, 25, size=(4096,))).astype(np.float32)
  parts = routing.bf16_parts(jnp.asarray(w))
  assert all(p.dtype == jnp.bfloat16 for p in parts)
  total = sum(np.asarray(p, np.float64) for p in parts)
  np.testing.assert_array_equal(total, w.astype(np.float64))
