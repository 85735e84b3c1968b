"""The routed layer against a naive per-token loop, and the grouped-FFN backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mohge_jax import experts
from mohge_jax.config import load_config

BACKENDS = ("reference", "ragged_dot", "tiled", "per_expert")
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
def test_all_experts_equals_per_token_loop(rng, kind, extra):
  """backend="all_experts" (decoding: every token through every expert, weighted 0 where
  it was not routed) on decode-shaped input [B, 1, D] gives the routed layer's value."""
  cfg = load_config(None, SMALL + ["model.init_std=0.2", *extra])
  layer = experts.RoutedFFN(cfg, kind, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x_Bx1xD = rng.normal(size=(5, 1, 32)).astype(np.float32)
  y, _ = layer(jnp.asarray(x_Bx1xD), backend="all_experts")
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_ffn_backends_agree_with_padding_and_empty_experts(rng, dtype):
  G, N, D = 3, 4, 16
  widths = [8, 12, 20]
  sizes = rng.integers(0, 9, size=G * N)
  sizes[rng.choice(G * N, 3, replace=False)] = 0  # empty experts
  sizes[rng.integers(G * N)] = 1  # a one-row expert
  M = int(sizes.sum()) + 5  # 5 padding rows
  x = jnp.asarray(rng.normal(size=(M, D)), dtype)
  wgu = [jnp.asarray(rng.normal(size=(N, D, 2 * w)) * 0.3, dtype) for w in widths]
  wd = [jnp.asarray(rng.normal(size=(N, w, D)) * 0.3, dtype) for w in widths]
  gs = jnp.asarray(sizes, jnp.int32)
  # float64 per-row truth.
  want = np.zeros((M, D))
  row = 0
  for e, s in enumerate(sizes):
    g, n = divmod(e, N)
    for _ in range(s):
      want[row] = np_swiglu_expert(np.asarray(x[row], np.float64),
                                   np.asarray(wgu[g][n], np.float64),
                                   np.asarray(wd[g][n], np.float64))
      row += 1
  tol = dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else dict(rtol=5e-2, atol=5e-2)
  outs = {}
  for backend in BACKENDS:
    f = jax.jit(lambda *a, b=backend: experts.grouped_ffn(*a, backend=b))
    outs[backend] = f(x, gs, wgu, wd)
    assert outs[backend].dtype == dtype
    np.testing.assert_allclose(np.asarray(outs[backend], np.float64), want, **tol)
    np.testing.assert_array_equal(np.asarray(outs[backend][-5:], np.float32), 0)
  # Gradients of both backends agree.
  ct = jnp.asarray(rng.normal(size=(M, D)), dtype)
  grads = {b: jax.grad(lambda x, a, c, b=b: jnp.sum(
      experts.grouped_ffn(x, gs, a, c, backend=b).astype(jnp.float32) * ct), argnums=(0, 1, 2))(
          x, wgu, wd) for b in BACKENDS}
  for b in BACKENDS[1:]:
    for want_g, got_g in zip(jax.tree.leaves(grads["reference"]), jax.tree.leaves(grads[b])):
      np.testing.assert_allclose(np.asarray(got_g, np.float32), np.asarray(want_g, np.float32),
                                 **tol, err_msg=b)


def test_unknown_backend():
  with pytest.raises(ValueError, match="expert backend"):
    experts.resolve_backend("cutlass")


def test_auto_backend_choice_on_hopper(monkeypatch):
  """On a Hopper GPU, 'auto' takes the Pallas kernels when they tile the shapes and falls
  back to 'tiled' (with a warning) when they do not; an explicit 'pallas' then errors."""
  import pallas_kernels
  from pallas_kernels import gpu
  assert gpu.unsupported_reason([128, 256, 1280], 1024) is None
  assert "multiples of 128" in gpu.unsupported_reason([128, 192], 512)
  assert "d_model 320" in gpu.unsupported_reason([128], 320)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  real = pallas_kernels.resolve_backend
  monkeypatch.setattr(pallas_kernels, "resolve_backend",
                      lambda b="auto": "mosaic_gpu" if b == "auto" else real(b))
  assert experts.resolve_backend("auto", [256, 384], 512) == "pallas"
  with pytest.warns(UserWarning, match="uses 'tiled'"):
    assert experts.resolve_backend("auto", [128, 192], 512) == "tiled"
  with pytest.raises(ValueError, match="expert_backend=pallas: .*multiples of 128"):
    experts.resolve_backend("pallas", [128, 192], 512)
  assert experts.resolve_backend("ragged_dot", [128, 192], 512) == "ragged_dot"


def test_per_expert_backend_across_several_row_tiles(rng):
  """The reference's one-expert-at-a-time loop (benchmark contrast): experts spanning
  several 128-row tiles, empty experts and padding rows, forward and gradients."""
  G, N, D, widths = 2, 2, 8, [4, 12]
  sizes = np.array([300, 0, 5, int(rng.integers(129, 260))])
  M = int(sizes.sum()) + 7
  x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  wgu = [jnp.asarray(rng.normal(size=(N, D, 2 * w)) * 0.3, jnp.float32) for w in widths]
  wd = [jnp.asarray(rng.normal(size=(N, w, D)) * 0.3, jnp.float32) for w in widths]
  gs = jnp.asarray(sizes, jnp.int32)
  ct = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  def loss(backend):
    return jax.jit(jax.value_and_grad(lambda x, a, b: jnp.sum(
        experts.grouped_ffn(x, gs, a, b, backend=backend) * ct), argnums=(0, 1, 2)))(x, wgu, wd)
  (want, want_g), (got, got_g) = loss("reference"), loss("per_expert")
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_permute_rows_gradient_is_a_gather_not_a_scatter(rng):
  """permute_rows(x, order, inverse) = x[order]; its gradient equals the plain gather's and
  is computed by gathering through the inverse (no scatter in the backward program)."""
  M, D = int(rng.integers(5, 40)), 8
  x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  order = jnp.asarray(rng.permutation(M), jnp.int32)
  inverse = experts.inverse_permutation(order)
  np.testing.assert_array_equal(np.asarray(inverse)[np.asarray(order)], np.arange(M))
  f = lambda x: jnp.sum(experts.permute_rows(x, order, inverse) * g)
  np.testing.assert_array_equal(np.asarray(experts.permute_rows(x, order, inverse)),
                                np.asarray(x)[np.asarray(order)])
  np.testing.assert_allclose(np.asarray(jax.grad(f)(x)),
                             np.asarray(jax.grad(lambda x: jnp.sum(x[order] * g))(x)))
  prims = {e.primitive.name for e in jax.make_jaxpr(jax.grad(f))(x).jaxpr.eqns}
  assert not any("scatter" in p for p in prims), prims


def test_count_ids_matches_bincount(rng):
  num = int(rng.integers(1, 12))
  ids = rng.integers(0, num + 2, size=(int(rng.integers(1, 50)), 3))  # some ids >= num
  want = np.bincount(ids.ravel(), minlength=num + 2)[:num]
  np.testing.assert_array_equal(np.asarray(experts.count_ids(jnp.asarray(ids), num)), want)


def test_tiled_in_chunks_of_items_equals_one_pass(rng):
  """The tiled backend runs its work items a chunk at a time (bounded weight copies); any
  chunk size gives the one-pass result, forward and gradients (empty experts, padding)."""
  G, N, D, tile = 2, 3, 8, 4
  widths = [4, 8]
  sizes = rng.integers(0, 11, size=G * N)
  sizes[rng.integers(G * N)] = 0
  M = int(sizes.sum()) + 3
  x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  wgu = [jnp.asarray(rng.normal(size=(N, D, 2 * w)) * 0.3, jnp.float32) for w in widths]
  wd = [jnp.asarray(rng.normal(size=(N, w, D)) * 0.3, jnp.float32) for w in widths]
  gs = jnp.asarray(sizes, jnp.int32)
  ct = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)

  def run(chunk):
    f = lambda x, a, c: jnp.sum(experts._ffn_tiled(x, gs, a, c, tile=tile,
                                                   items_per_chunk=chunk) * ct)
    return experts._ffn_tiled(x, gs, wgu, wd, tile=tile, items_per_chunk=chunk), \
        jax.grad(f, argnums=(0, 1, 2))(x, wgu, wd)

  want = run(1 << 20)  # every item at once
  for chunk in (1, int(rng.integers(2, 6))):
    for a, b in zip(jax.tree.leaves(run(chunk)), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
