"""mohge_jax.dispatch: the grouped-FFN backends against each other and a per-expert numpy
loop (padding, empty experts, bf16), the backend choice, and the permutation and counting
primitives of the dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mohge_jax import dispatch
from tests.test_experts import np_swiglu_expert

BACKENDS = ("reference", "ragged_dot", "tiled", "per_expert")


def random_rows_and_weights(rng, sizes, N: int, D: int, widths, pad: int, dtype=jnp.float32):
  """Rows for the given experts' sizes plus `pad` padding rows, each group's weights, the
  sizes as int32 and a cotangent: (x [M, D], w_gate_up, w_down, sizes, ct [M, D])."""
  M = int(np.sum(sizes)) + pad
  x = jnp.asarray(rng.normal(size=(M, D)), dtype)
  wgu = [jnp.asarray(rng.normal(size=(N, D, 2 * w)) * 0.3, dtype) for w in widths]
  wd = [jnp.asarray(rng.normal(size=(N, w, D)) * 0.3, dtype) for w in widths]
  return x, wgu, wd, jnp.asarray(sizes, jnp.int32), jnp.asarray(rng.normal(size=(M, D)), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_ffn_backends_agree_with_padding_and_empty_experts(rng, dtype):
  G, N, D = 3, 4, 16
  widths = [8, 12, 20]
  sizes = rng.integers(0, 9, size=G * N)
  sizes[rng.choice(G * N, 3, replace=False)] = 0  # empty experts
  sizes[rng.integers(G * N)] = 1  # a one-row expert
  x, wgu, wd, gs, ct = random_rows_and_weights(rng, sizes, N, D, widths, 5, dtype)  # 5 pad rows
  M = x.shape[0]
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
    f = jax.jit(lambda *a, b=backend: dispatch.grouped_ffn(*a, backend=b))
    outs[backend] = f(x, gs, wgu, wd)
    assert outs[backend].dtype == dtype
    np.testing.assert_allclose(np.asarray(outs[backend], np.float64), want, **tol)
    np.testing.assert_array_equal(np.asarray(outs[backend][-5:], np.float32), 0)
  # Every backend's gradients against the float32 reference's on the same values.
  def grads(backend, *args):
    return jax.grad(lambda x, a, c, ct: jnp.sum(dispatch.grouped_ffn(
        x, gs, a, c, backend=backend).astype(jnp.float32) * ct), argnums=(0, 1, 2))(*args)
  f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
  truth = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads("reference", *f32(
      (x, wgu, wd, ct))))]
  for b in BACKENDS:
    for want_g, got_g in zip(truth, jax.tree.leaves(grads(b, x, wgu, wd, ct))):
      got_g = np.asarray(got_g, np.float64)
      if dtype == jnp.float32:
        np.testing.assert_allclose(got_g, want_g, **tol, err_msg=b)
        continue
      # bf16: an element near zero can be a sum of large rounded terms, so the bound scales
      # with the RMS of its expert's slice (its row, for the input's gradient). 300 seeds:
      # the worst error was 0.062 of this bound's scale, a missing expert's would be 1.
      rms = np.sqrt(np.mean(want_g**2, axis=tuple(range(1, want_g.ndim)), keepdims=True))
      bad = np.abs(got_g - want_g) > 0.05 * np.abs(want_g) + 0.15 * rms
      assert not bad.any(), (b, np.argwhere(bad)[:5], got_g[bad][:5], want_g[bad][:5])


def test_unknown_backend():
  with pytest.raises(ValueError, match="expert backend"):
    dispatch.resolve_backend("cutlass")


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
  assert dispatch.resolve_backend("auto", [256, 384], 512) == "pallas"
  with pytest.warns(UserWarning, match="uses 'tiled'"):
    assert dispatch.resolve_backend("auto", [128, 192], 512) == "tiled"
  with pytest.raises(ValueError, match="expert_backend=pallas: .*multiples of 128"):
    dispatch.resolve_backend("pallas", [128, 192], 512)
  assert dispatch.resolve_backend("ragged_dot", [128, 192], 512) == "ragged_dot"


def test_per_expert_backend_across_several_row_tiles(rng):
  """The reference's one-expert-at-a-time loop (benchmark contrast): experts spanning
  several 128-row tiles, empty experts and padding rows, forward and gradients."""
  N, D, widths = 2, 8, [4, 12]
  sizes = np.array([300, 0, 5, int(rng.integers(129, 260))])
  x, wgu, wd, gs, ct = random_rows_and_weights(rng, sizes, N, D, widths, 7)
  def loss(backend):
    return jax.jit(jax.value_and_grad(lambda x, a, b: jnp.sum(
        dispatch.grouped_ffn(x, gs, a, b, backend=backend) * ct), argnums=(0, 1, 2)))(x, wgu, wd)
  (want, want_g), (got, got_g) = loss("reference"), loss("per_expert")
  # The loss sums ~4k float32 terms that largely cancel: a tolerance on its value alone
  # failed for 1 seed in a few hundred (|diff| 5e-6 on -0.28); scale it by the terms.
  terms = np.abs(np.asarray(dispatch.grouped_ffn(x, gs, wgu, wd, backend="reference") * ct))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6 * terms.sum())
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_permute_rows_gradient_is_a_gather_not_a_scatter(rng):
  """permute_rows(x, order, inverse) = x[order]; its gradient equals the plain gather's and
  is computed by gathering through the inverse (no scatter in the backward program)."""
  M, D = int(rng.integers(5, 40)), 8
  x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  order = jnp.asarray(rng.permutation(M), jnp.int32)
  inverse = dispatch.inverse_permutation(order)
  np.testing.assert_array_equal(np.asarray(inverse)[np.asarray(order)], np.arange(M))
  f = lambda x: jnp.sum(dispatch.permute_rows(x, order, inverse) * g)
  np.testing.assert_array_equal(np.asarray(dispatch.permute_rows(x, order, inverse)),
                                np.asarray(x)[np.asarray(order)])
  np.testing.assert_allclose(np.asarray(jax.grad(f)(x)),
                             np.asarray(jax.grad(lambda x: jnp.sum(x[order] * g))(x)))
  prims = {e.primitive.name for e in jax.make_jaxpr(jax.grad(f))(x).jaxpr.eqns}
  assert not any("scatter" in p for p in prims), prims


@pytest.mark.parametrize("bins", [(1, 12), (dispatch.ONE_HOT_MAX_BINS + 1, 200)])
def test_count_ids_matches_bincount(rng, bins):
  """Both ways of counting: the one-hot sum (up to ONE_HOT_MAX_BINS) and the sorted ids."""
  num = int(rng.integers(*bins))
  ids = rng.integers(-2, num + 2, size=(int(rng.integers(1, 700)), 3))  # some outside
  want = (ids.reshape(-1, 1) == np.arange(num)).sum(0)
  np.testing.assert_array_equal(np.asarray(dispatch.count_ids(jnp.asarray(ids), num)), want)


def test_tiled_in_chunks_of_items_equals_one_pass(rng):
  """The tiled backend runs its work items a chunk at a time (bounded weight copies); any
  chunk size gives the one-pass result, forward and gradients (empty experts, padding)."""
  G, N, D, tile = 2, 3, 8, 4
  widths = [4, 8]
  sizes = rng.integers(0, 11, size=G * N)
  sizes[rng.integers(G * N)] = 0
  x, wgu, wd, gs, ct = random_rows_and_weights(rng, sizes, N, D, widths, 3)

  def run(chunk):
    f = lambda x, a, c: jnp.sum(dispatch._ffn_tiled(x, gs, a, c, tile=tile,
                                                   items_per_chunk=chunk) * ct)
    return dispatch._ffn_tiled(x, gs, wgu, wd, tile=tile, items_per_chunk=chunk), \
        jax.grad(f, argnums=(0, 1, 2))(x, wgu, wd)

  want = run(1 << 20)  # every item at once
  for chunk in (1, int(rng.integers(2, 6))):
    for a, b in zip(jax.tree.leaves(run(chunk)), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _pairs_reference(x, ids, w, wgu, wd):
  """Per token, per chosen expert, float64."""
  N = [a.shape[0] for a in wgu]
  first = np.cumsum([0] + N)
  y = np.zeros(x.shape, np.float64)
  for t in range(x.shape[0]):
    for k in range(ids.shape[1]):
      g = int(np.searchsorted(first, ids[t, k], side="right") - 1)
      n = int(ids[t, k] - first[g])
      h = x[t] @ wgu[g][n]
      gate, up = np.split(h, 2)
      y[t] += w[t, k] * ((gate / (1 + np.exp(-gate)) * up) @ wd[g][n])
  return y


@pytest.mark.parametrize("case", ["bounded", "overflow", "small_batch"])
def test_capacity_experts_equals_per_pair_loop(rng, case):
  """capacity_experts (decoding's fixed-capacity slots per expert): the routed value, in
  the bounded case (every expert within C < T rows), when an expert overflows C (the
  all_experts fallback) and when C would reach T."""
  widths, N, D, K = (8, 16, 24), 4, 16, 3
  E = N * len(widths)
  T = 6 if case == "small_batch" else 96
  if case == "bounded":  # each expert gets exactly T*K/E = 24 rows, C = 48
    ids = (np.arange(T * K).reshape(T, K) + rng.integers(E)) % E  # balanced, distinct per row
  elif case == "overflow":  # every token's first expert is expert 5
    ids = np.stack([np.concatenate([[5], rng.choice(np.delete(np.arange(E), 5), K - 1,
                                                     replace=False)]) for _ in range(T)])
  else:
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
  counts = np.bincount(ids.ravel(), minlength=E)
  C = dispatch.expert_capacity(T, K, E)
  assert {"bounded": counts.max() <= C < T, "overflow": counts.max() > C,
          "small_batch": C >= T}[case]
  x = rng.normal(size=(T, D))
  w = rng.uniform(size=(T, K))
  wgu = [rng.normal(size=(N, D, 2 * f)) / 4 for f in widths]
  wd = [rng.normal(size=(N, f, D)) / 4 for f in widths]
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  # float32 products on any backend (a GPU's default is TF32: 1e-3, against float64 here)
  with jax.default_matmul_precision("highest"):
    got = dispatch.capacity_experts(f32(x), jnp.asarray(ids, jnp.int32), f32(w),
                                    [f32(a) for a in wgu], [f32(a) for a in wd])
  np.testing.assert_allclose(np.asarray(got), _pairs_reference(x, ids, w, wgu, wd),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("C", [2, 5, 40])
def test_capacity_slots_rank_pairs_in_token_order(rng, C):
  """_capacity_slots against a loop over the pairs in token order: each pair's slot e * C
  + (its rank among expert e's pairs, clipped to C - 1), the token in every slot filled
  (ranks below C), empty slots token 0 and not filled, the counts; skewed routing so some
  experts overflow the small capacities."""
  T, K, E = 37, 4, 16
  p = rng.dirichlet(np.full(E, 0.3))
  ids = np.stack([rng.choice(E, K, replace=False, p=p) for _ in range(T)]).astype(np.int32)
  got = dispatch._capacity_slots(jnp.asarray(ids), E, C)
  chosen = np.zeros((T, E), bool)
  np.put_along_axis(chosen, ids, True, axis=1)
  # the same from the routing's chosen mask (Routing.chosen) as from the ids
  jax.tree.map(np.testing.assert_array_equal, got,
               dispatch._capacity_slots(jnp.asarray(ids), E, C, jnp.asarray(chosen)))
  with pytest.raises(ValueError, match="chosen"):
    dispatch._capacity_slots(jnp.asarray(ids), E, C, jnp.asarray(chosen[:, 1:]))
  token, filled, slot, counts = (np.asarray(a) for a in got)
  seen = np.zeros(E, np.int64)
  want_token, want_slot = np.zeros((E, C), np.int64), []
  for t in range(T):
    for k in range(K):
      e = ids[t, k]
      if seen[e] < C:
        want_token[e, seen[e]] = t
      want_slot.append(e * C + min(seen[e], C - 1))
      seen[e] += 1
  np.testing.assert_array_equal(counts, seen)
  np.testing.assert_array_equal(slot, want_slot)
  np.testing.assert_array_equal(filled, np.arange(C) < seen[:, None])
  np.testing.assert_array_equal(token, want_token)
  assert (C < 40) == (seen.max() > C)   # the small capacities overflow, 40 does not


@pytest.mark.parametrize("case", ["bounded", "overflow"])
def test_capacity_experts_through_the_kernels_equals_per_pair_loop(rng, case):
  """capacity_experts(stacked=stack_experts(...)): the slot block through the Mosaic GPU
  kernels (Pallas interpreter here; C rounded up to the 64-row tile, one tile an expert):
  the routed value in bf16, bounded, and when an expert overflows C (the fallback)."""
  widths, N, D, K, T = (128, 256), 4, 128, 2, 48
  E = N * len(widths)
  if case == "bounded":
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
  else:  # expert 3 in all 80 rows: C = 40 rounded up to 64
    T = 80
    ids = np.stack([np.concatenate([[3], rng.choice(np.delete(np.arange(E), 3), K - 1,
                                                     replace=False)]) for _ in range(T)])
  st = dispatch.stack_experts
  C = -(-dispatch.expert_capacity(T, K, E) // 64) * 64
  assert (np.bincount(ids.ravel(), minlength=E).max() <= C) == (case == "bounded")
  x = rng.normal(size=(T, D))
  w = rng.uniform(size=(T, K))
  wgu = [rng.normal(size=(N, D, 2 * f)) / 12 for f in widths]
  wd = [rng.normal(size=(N, f, D)) / 12 for f in widths]
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
  wgu_b, wd_b = [bf(a) for a in wgu], [bf(a) for a in wd]
  stacked = st(wgu_b, wd_b, interpret=True)
  got = jax.jit(lambda x, i, w, s: dispatch.capacity_experts(x, i, w, wgu_b, wd_b, stacked=s))(
      bf(x), jnp.asarray(ids, jnp.int32), jnp.asarray(w, jnp.float32), stacked)
  want = _pairs_reference(np.asarray(bf(x), np.float64), ids, w,
                          [np.asarray(a, np.float64) for a in wgu_b],
                          [np.asarray(a, np.float64) for a in wd_b])
  np.testing.assert_allclose(np.asarray(got), want, rtol=0.03, atol=0.03 * np.abs(want).max())
  if case == "bounded":   # the slot kernels with pdl=1: the same values
    pdl = jax.jit(lambda x, i, w, s: dispatch.capacity_experts(x, i, w, wgu_b, wd_b, stacked=s))(
        bf(x), jnp.asarray(ids, jnp.int32), jnp.asarray(w, jnp.float32),
        st(wgu_b, wd_b, interpret=True, pdl=1))
    np.testing.assert_array_equal(np.asarray(pdl), np.asarray(got))
    with pytest.raises(ValueError, match="pdl=2: must be 0 or 1"):
      st(wgu_b, wd_b, interpret=True, pdl=2)
  with pytest.raises(ValueError, match="stack_experts: the Mosaic GPU kernels need expert "
                                       "widths and d_model to be multiples of 128"):
    st([bf(np.zeros((N, D, 2 * 96)))], [bf(np.zeros((N, 96, D)))])
  with pytest.raises(ValueError, match="take bfloat16 or float16 weights; got \\['float32'\\]"):
    st([jnp.zeros((N, D, 2 * 128))], [jnp.zeros((N, 128, D))])
