"""DeepSeek Sparse Attention: selection, the chunked sparse MLA against the dense-mask
reference, the indexer's KL against numpy, dense equality with seq <= top-k, and where each
loss's gradients go."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from flax import nnx

from mohge_jax import sparse_attention as dsa
from mohge_jax.config import ConfigError, load_config
from mohge_jax.model import Transformer

TINY = ["model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
        "model.dense_ffn_width=48", "model.group_widths=[8,16]", "model.experts_per_group=2",
        "model.top_k_groups=1", "model.top_k=2", "model.shared_expert_width=8",
        "model.num_layers=2", "model.max_seq_len=64", "model.init_std=0.1", "train.seq_len=32",
        "model.sparse_attention=dsa", "model.dsa_index_heads=2", "model.dsa_index_dim=8",
        "model.dsa_index_rope_dim=4", "model.dsa_query_chunk=5"]


@pytest.mark.parametrize("chunk", [4, 16])
def test_sparse_mla_equals_dense_mask_reference(rng, chunk):
  B, T, H, C, R, K = 2, 11, 3, 8, 4, 6
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  q_lat, q_rope, c, kr = f(B, T, H, C), f(B, T, H, R), f(B, T, C), f(B, T, R)
  # Distinct keys per query: position t itself first, then random others (some after t).
  idx = np.stack([np.stack([np.concatenate([[t], rng.permutation(np.delete(np.arange(T), t))[:K - 1]])
                            for t in range(T)]) for _ in range(B)])
  valid = jnp.asarray(idx <= np.arange(T)[None, :, None])
  idx = jnp.asarray(idx, jnp.int32)
  g_out = f(B, T, H, C)

  def sparse(q_lat, q_rope, c, kr):
    o, _ = dsa.sparse_mla(q_lat, q_rope, c, kr, idx, valid, scale=0.3, chunk=chunk)
    return jnp.sum(o * g_out)

  def dense(q_lat, q_rope, c, kr):
    return jnp.sum(dsa.dense_mask_mla(q_lat, q_rope, c, kr, idx, valid, scale=0.3) * g_out)

  args = (q_lat, q_rope, c, kr)
  o_sparse, _ = dsa.sparse_mla(*args, idx, valid, scale=0.3, chunk=chunk)
  np.testing.assert_allclose(o_sparse, dsa.dense_mask_mla(*args, idx, valid, scale=0.3),
                             rtol=1e-5, atol=1e-5)
  g_sparse = jax.grad(sparse, argnums=(0, 1, 2, 3))(*args)
  g_dense = jax.grad(dense, argnums=(0, 1, 2, 3))(*args)
  for a, b in zip(g_sparse, g_dense):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _np_scores(q, w, k):
  return np.einsum("btjs,btj->bts", np.maximum(np.einsum("btji,bsi->btjs", q, k), 0), w)


@pytest.mark.parametrize("T,topk,chunk,method", [(9, 4, 4, "sort"), (6, 16, 4, "sort"),
                                                 (7, 7, 3, "sort"), (9, 4, 4, "radix"),
                                                 (6, 16, 4, "radix"), (9, 4, 4, "sample"),
                                                 (30, 4, 8, "sample"), (30, 4, 8, "threshold")])
def test_select_topk_is_the_causal_top_k(rng, T, topk, chunk, method):
  B, J, I = 2, 3, 5
  q, w, k = rng.normal(size=(B, T, J, I)), rng.normal(size=(B, T, J)), rng.normal(size=(B, T, I))
  idx, valid, score = dsa.select_topk(*(jnp.asarray(a, jnp.float32) for a in (q, w, k)),
                                      topk=topk, chunk=chunk, method=method)
  K = min(topk, T)
  assert idx.shape == valid.shape == score.shape == (B, T, K)
  s = _np_scores(q, w, k)
  for b in range(B):
    for t in range(T):
      chosen = set(np.asarray(idx[b, t])[np.asarray(valid[b, t])].tolist())
      allowed = np.arange(t + 1)
      want = set(allowed[np.argsort(-s[b, t, :t + 1], kind="stable")][:K].tolist())
      assert chosen == want, (b, t)
  np.testing.assert_allclose(score, np.take_along_axis(s, np.asarray(idx), -1), rtol=1e-4,
                             atol=1e-5)


def _count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive `name` in a jaxpr and every jaxpr nested in its equations."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count_primitive(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count_primitive(sub, name)
  return n


def test_select_topk_gradient_runs_the_selection_once(rng):
  """A training step selects once: the gradient's program holds one top_k (the forward's;
  the backward of the selected scores recomputes the index scores only, where one
  rematerialised chunk function for both used to run the top-k again), over several chunks;
  the scores' gradient equals the dense formula's on the same keys."""
  B, T, J, I, K = 1, 12, 2, 4, 4
  q, w, k = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((B, T, J, I), (B, T, J), (B, T, I)))
  ct = jnp.asarray(rng.normal(size=(B, T, K)), jnp.float32)
  f = lambda q, w, k: jnp.sum(dsa.select_topk(q, w, k, topk=K, chunk=4)[2] * ct)  # noqa: E731
  grad = jax.grad(f, argnums=(0, 1, 2))
  # one top_k per causal band (3 chunks: 3 bands) in the forward, none more in the gradient
  assert _count_primitive(jax.make_jaxpr(f)(q, w, k).jaxpr, "top_k") == 3
  assert _count_primitive(jax.make_jaxpr(grad)(q, w, k).jaxpr, "top_k") == 3
  f1 = lambda q, w, k: jnp.sum(dsa.select_topk(  # noqa: E731
      q, w, k, topk=K, chunk=4, bands=1)[2] * ct)
  assert _count_primitive(jax.make_jaxpr(jax.grad(f1))(q, w, k).jaxpr, "top_k") == 1
  idx = dsa.select_topk(q, w, k, topk=K, chunk=4)[0]
  want = jax.grad(lambda q, w, k: jnp.sum(jnp.take_along_axis(
      dsa.index_scores(q, w, k), idx, -1) * ct), argnums=(0, 1, 2))(q, w, k)
  for a, b in zip(grad(q, w, k), want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for scores in ("gather", "dense"):  # (auto: dense at S = 12 < 32 K)
    g = lambda q, w, k, s=scores: jnp.sum(dsa.select_topk(  # noqa: E731
        q, w, k, topk=K, chunk=4, scores=s)[2] * ct)
    for a, b in zip(jax.grad(g, argnums=(0, 1, 2))(q, w, k), want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=scores)
  with pytest.raises(ValueError, match="scores='sparse': must be"):
    dsa.select_topk(q, w, k, topk=K, chunk=4, scores="sparse")


def test_top_k_sampled_is_top_k(rng):
  """top_k_sampled returns jax.lax.top_k's positions in its order. Rows of fresh normals
  take the candidates' path (checked: every row's threshold let through k..4k entries,
  from a sample of every 2nd entry: a miss is a 5-sigma event); rows it cannot serve
  (many ties at the k-th value, half or all masked, zeros of both signs) send the whole
  block to top_k, still exact."""
  N, S, k = 5, 4000, int(rng.integers(100, 200))
  x = rng.normal(size=(N, S)).astype(np.float32)
  want = np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1])
  for compact in ("scatter", "search"):
    fast, ok = dsa._top_k_of_candidates(jnp.asarray(x), k, sample=2000, oversample=2.0,
                                        compact=compact)
    assert np.asarray(ok).all()
    np.testing.assert_array_equal(np.asarray(fast), want, err_msg=compact)
  f = jax.jit(functools.partial(dsa.top_k_sampled, sample=2000), static_argnums=1)
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), k)), want)
  x[1] = np.round(x[1] * 2) / 2
  x[2, rng.random(S) < 0.5] = -np.inf
  x[3] = -np.inf
  x[4] = np.where(rng.random(S) < 0.5, np.float32(0.0), np.float32(-0.0))
  _, ok = dsa._top_k_of_candidates(jnp.asarray(x), k, sample=2000, oversample=2.0)
  assert not np.asarray(ok)[3:].any()  # all masked; ties: top_k's path
  for kk in (1, k, S):
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), kk)),
                                  np.asarray(jax.lax.top_k(jnp.asarray(x), kk)[1]),
                                  err_msg=f"k={kk}")
  with pytest.raises(ValueError, match="k=0: must be between 1 and the row length 5"):
    dsa.top_k_sampled(jnp.zeros((2, 5)), 0)
  with pytest.raises(ValueError, match="compact='sorted': must be 'scatter' or 'search'"):
    dsa.top_k_sampled(jnp.zeros((2, 5)), 1, compact="sorted")


def test_top_k_positions_is_top_k_without_a_sort(rng):
  """top_k_positions gives jax.lax.top_k's positions as a set (ties at the k-th value to
  the lower positions, and -0.0 below 0.0, as top_k), in increasing order, on fresh rows:
  plain, many ties, half the keys masked (-inf), all masked, zeros of both signs; k from
  1 to the row length. Its program has no sort."""
  N, S = 6, int(rng.integers(100, 200))
  x = rng.normal(size=(N, S)).astype(np.float32)
  x[1] = np.round(x[1] * 2) / 2
  x[2, rng.random(S) < 0.5] = -np.inf
  x[3] = -np.inf
  x[4] = np.where(rng.random(S) < 0.5, np.float32(0.0), np.float32(-0.0))
  x[5, : S // 2] = np.where(rng.random(S // 2) < 0.3, -np.inf, np.round(x[5, : S // 2]))
  f = jax.jit(dsa.top_k_positions, static_argnums=1)
  for k in (1, int(rng.integers(2, S)), S):
    want = np.sort(np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1]), axis=1)
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), k)), want, err_msg=f"k={k}")
  text = f.lower(jnp.asarray(x), 20).as_text()
  assert "stablehlo.sort" not in text and "chlo.top_k" not in text
  with pytest.raises(ValueError, match="k=0: must be between 1 and the row length 5"):
    dsa.top_k_positions(jnp.zeros((2, 5)), 0)
  with pytest.raises(ValueError, match="digit_bits=3: must divide"):
    dsa.top_k_positions(jnp.zeros((2, 5)), 2, digit_bits=3)
  with pytest.raises(ValueError, match="top-k method 'heap'"):
    dsa.select_topk(jnp.zeros((1, 2, 1, 2)), jnp.zeros((1, 2, 1)), jnp.zeros((1, 2, 2)),
                    topk=1, chunk=2, method="heap")


def test_top_k_threshold_is_top_k_positions(rng):
  """top_k_threshold returns top_k_positions' result exactly (jax.lax.top_k's set, by
  rising position) on fresh rows: through the candidates' path (checked: every row's
  threshold let k..4k entries through, a sample of every 2nd entry) and, for rows it cannot
  serve (many ties at the k-th value, half or all masked, zeros of both signs), through the
  fallback; k from 1 to the row length, and k >= S / 8 (a buffer of 8k would hold the row:
  no candidates' path). Its program has no sort."""
  N, S, k = 5, 4000, int(rng.integers(100, 200))
  x = rng.normal(size=(N, S)).astype(np.float32)
  f = jax.jit(functools.partial(dsa.top_k_threshold, sample=2000), static_argnums=1)
  want = np.sort(np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1]), axis=1)
  key = dsa._order_key(jnp.asarray(x))
  tau = dsa._kth_key(key[:, ::2], round(2.0 * k / 2))
  count = np.asarray(jnp.sum(key >= tau[:, None], axis=1))
  assert ((count >= k) & (count <= 4 * k)).all(), count  # the fast path serves these rows
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), k)), want)
  x[1] = np.round(x[1] * 2) / 2
  x[2, rng.random(S) < 0.5] = -np.inf
  x[3] = -np.inf
  x[4] = np.where(rng.random(S) < 0.5, np.float32(0.0), np.float32(-0.0))
  for kk in (1, k, S):
    np.testing.assert_array_equal(
        np.asarray(f(jnp.asarray(x), kk)),
        np.sort(np.asarray(jax.lax.top_k(jnp.asarray(x), kk)[1]), axis=1), err_msg=f"k={kk}")
  text = f.lower(jnp.asarray(x), k).as_text()
  assert "stablehlo.sort" not in text and "chlo.top_k" not in text
  assert "stablehlo.case" in text  # the candidates' path with its fallback
  # A buffer of 8k entries would hold the whole row: the radix select on the row itself.
  kk = -(-S // 8)
  np.testing.assert_array_equal(
      np.asarray(f(jnp.asarray(x), kk)),
      np.sort(np.asarray(jax.lax.top_k(jnp.asarray(x), kk)[1]), axis=1), err_msg=f"k={kk}")
  assert "stablehlo.case" not in f.lower(jnp.asarray(x), kk).as_text()
  with pytest.raises(ValueError, match="k=0: must be between 1 and the row length 5"):
    dsa.top_k_threshold(jnp.zeros((2, 5)), 0)


@pytest.mark.parametrize("method", ["sort", "threshold"])
def test_causal_bands_select_the_same_keys(rng, method):
  """select_topk's causal bands (each band's chunks over only the keys its queries may see):
  for 1, 3 and 7 bands the same valid keys, the same scores of them and the same gradients, with
  a ragged last chunk, documents, and top-k above the first band's keys. (threshold: K = 4,
  so that a band over more than 8K = 32 keys, the one band or the last, takes the
  candidates' path, not the radix select of the whole row.)"""
  B, T, J, I = 2, 37, 2, 4
  K = 4 if method == "threshold" else 6
  q, w, k = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((B, T, J, I), (B, T, J), (B, T, I)))
  seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(B, T)), axis=1))
  ct = jnp.asarray(rng.normal(size=(B, T, K)), jnp.float32)
  outs = []
  for bands in (1, 3, 7):
    def f(q, w, k, bands=bands):
      idx, valid, score = dsa.select_topk(q, w, k, topk=K, chunk=4, segment_ids_BxT=seg,
                                          method=method, bands=bands)
      return jnp.sum(jnp.where(valid, score, 0) * ct), (idx, valid, score)
    grads, (idx, valid, score) = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, w, k)
    order = np.argsort(np.where(valid, idx, T + 1), axis=-1)  # valid keys by position
    take = lambda a, order=order: np.take_along_axis(np.asarray(a), order, -1)  # noqa: E731
    outs.append((take(np.where(valid, idx, -1)), take(valid),
                 take(np.where(valid, score, 0)), grads))
  for got in outs[1:]:
    for a, b in zip(got[:3], outs[0][:3]):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(got[3], outs[0][3]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_select_topk_respects_documents(rng):
  B, T, J, I = 1, 8, 2, 4
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 2]])
  q, w, k = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, J, I), (B, T, J), (B, T, I)))
  idx, valid, _ = dsa.select_topk(q, w, k, topk=8, chunk=3, segment_ids_BxT=seg)
  for t in range(T):
    chosen = sorted(np.asarray(idx[0, t])[np.asarray(valid[0, t])].tolist())
    assert chosen == [s for s in range(t + 1) if seg[0, s] == seg[0, t]]


def test_dense_indexer_kl_matches_numpy(rng):
  B, T, H, C, R, J, I = 2, 7, 2, 6, 4, 2, 3
  f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
  q_lat, q_rope, c, kr, qi, wi, ki = (f(B, T, H, C), f(B, T, H, R), f(B, T, C), f(B, T, R),
                                      f(B, T, J, I), f(B, T, J), f(B, T, I))
  kl = dsa.dense_indexer_kl(*map(jnp.asarray, (q_lat, q_rope, c, kr, qi, wi, ki)), scale=0.5,
                            chunk=3)
  logits = 0.5 * (np.einsum("bthc,bsc->bths", q_lat, c) + np.einsum("bthr,bsr->bths", q_rope, kr))
  causal = np.tril(np.ones((T, T), bool))
  logits = np.where(causal[None, :, None], logits, -np.inf).astype(np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = (p / p.sum(-1, keepdims=True)).sum(2) / H
  s = np.where(causal[None], _np_scores(qi, wi, ki), -np.inf).astype(np.float64)
  log_q = s - s.max(-1, keepdims=True)
  log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
  log_q = np.where(causal[None], log_q, 0)
  want = np.where(causal[None], p * (np.log(np.where(causal[None], p, 1)) - log_q), 0).sum(-1)
  np.testing.assert_allclose(kl, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["model.q_lora_rank=12"]])
def test_sparse_equals_dense_when_seq_fits_top_k(rng, extra):
  cfg = load_config("configs/tiny.yaml", TINY + extra + ["model.dsa_topk=16"])
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = jnp.asarray(rng.normal(size=(2, 12, 32)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  attn = model.stacks[0].layers.attn
  graphdef, state = nnx.split(attn)
  layer0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
  layer0.dsa_stage = "sparse"
  sparse, aux_s = layer0(x, pos)
  layer0.dsa_stage = "dense_warmup"
  dense, aux_d = layer0(x, pos)
  np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)
  # With every allowed key selected, both stages' KL targets are the same distribution.
  np.testing.assert_allclose(aux_s["dsa_kl"], aux_d["dsa_kl"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stage", ["sparse", "dense_warmup"])
def test_lm_gradients_skip_the_indexer_and_kl_reaches_only_it(rng, stage):
  cfg = load_config("configs/tiny.yaml", TINY + ["model.dsa_topk=4", f"train.dsa_stage={stage}"])
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(rng.integers(0, 257, size=(2, 13)))

  def parts(params):
    logits, aux = nnx.merge(graphdef, params)(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), aux["dsa_kl"]

  g_lm, g_kl = jax.jit(lambda p: (jax.grad(lambda p: parts(p)[0])(p),
                                   jax.grad(lambda p: parts(p)[1])(p)))(params)
  flat_lm = jax.tree_util.tree_leaves_with_path(g_lm)
  flat_kl = jax.tree_util.tree_leaves_with_path(g_kl)
  is_indexer = lambda path: "indexer" in jax.tree_util.keystr(path)  # noqa: E731
  assert any(is_indexer(p) for p, _ in flat_lm)
  for (path, a), (_, b) in zip(flat_lm, flat_kl):
    if is_indexer(path):
      assert not np.any(np.asarray(a)), f"LM gradient reaches {jax.tree_util.keystr(path)}"
    else:
      assert not np.any(np.asarray(b)), f"KL gradient reaches {jax.tree_util.keystr(path)}"
  assert any(np.any(np.asarray(b)) for p, b in flat_kl if is_indexer(p))
  assert any(np.any(np.asarray(a)) for p, a in flat_lm if "w_o" in jax.tree_util.keystr(p))


@pytest.mark.parametrize("override,field", [
    (["model.sparse_attention=sparse"], "model.sparse_attention"),
    (["model.dsa_topk=0"], "model.dsa_topk"),
    (["model.dsa_index_rope_dim=3"], "model.dsa_index_rope_dim"),
    (["model.dsa_index_rope_dim=16"], "model.dsa_index_rope_dim"),
    (["train.dsa_stage=warm"], "train.dsa_stage"),
    (["model.dsa_impl=fast"], "model.dsa_impl"),
    (["loss.dsa_kl_coef=-1"], "loss.dsa_kl_coef"),
    (["model.attention=mha", "model.head_dim=8"], "model.sparse_attention=dsa"),
])
def test_config_errors_name_the_field(override, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    load_config("configs/tiny.yaml", TINY + override)


@pytest.mark.parametrize("extra", [
    ["train.dsa_stage=sparse", "model.remat=full"],
    ["train.dsa_stage=sparse", "model.scan_layers=false", "model.q_lora_rank=12"],
    ["train.dsa_stage=dense_warmup", "model.doc_attention_mask=true"],
])
def test_model_stays_causal_with_top_k_below_the_length(rng, extra):
  cfg = load_config("configs/tiny.yaml", TINY + ["model.dsa_topk=4"] + extra)
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  B, L, t = 2, 14, int(rng.integers(4, 12))
  tokens = rng.integers(1, 257, size=(B, L))
  changed = tokens.copy()
  changed[:, t + 1:] = rng.integers(1, 257, size=(B, L - t - 1))
  seg = jnp.asarray(np.repeat([[0] * 5 + [1] * (L - 5)], B, 0))
  (a, aux_a), (b, _) = (jax.jit(lambda x: model(x, None, seg))(jnp.asarray(x))
                        for x in (tokens, changed))
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])
  assert np.isfinite(float(aux_a["dsa_kl"])) and float(aux_a["dsa_kl"]) > 0


def test_radix_top_k_model_equals_sort(rng):
  """model.dsa_topk_method=radix (and sample): the same keys as sort (radix in another
  order), so the same logits and indexer KL to float32 summation order, with top-k below
  the length."""
  outs, seed = [], int(rng.integers(1 << 30))
  tokens = jnp.asarray(rng.integers(1, 257, size=(2, 14)))
  for method in ("sort", "radix", "sample", "threshold"):
    cfg = load_config("configs/tiny.yaml", TINY + ["model.dsa_topk=4", "train.dsa_stage=sparse",
                                                   f"model.dsa_topk_method={method}"])
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    outs.append(jax.jit(lambda x, model=model: model(x))(tokens))
  (a, aux_a), *others = outs
  for b, aux_b in others:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux_a["dsa_kl"]), float(aux_b["dsa_kl"]), rtol=1e-5)


def test_remat_can_keep_the_selection(rng):
  """model.remat=save_dsa_selection: the gradients of remat=full (to float32 rounding) with
  one top-k a layer in the gradient's program instead of two (full runs the forward's
  again in the backward pass)."""
  tokens = jnp.asarray(rng.integers(1, 257, size=(2, 14)))
  seed, grads, counts = int(rng.integers(1 << 30)), [], []
  for remat in ("full", "save_dsa_selection"):
    cfg = load_config("configs/tiny.yaml", TINY + ["model.dsa_topk=4", f"model.remat={remat}",
                                                   "model.num_layers=1"])
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))

    def loss(params, graphdef=graphdef):
      logits, aux = nnx.merge(graphdef, params)(tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + aux["dsa_kl"]
    grad = jax.grad(loss)
    counts.append(_count_primitive(jax.make_jaxpr(grad)(params).jaxpr, "top_k"))
    grads.append(jax.jit(grad)(params))
  assert counts[1] < counts[0], counts
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_sparse_step_is_finite(rng):
  cfg = load_config("configs/tiny.yaml", TINY + ["model.dsa_topk=4", "model.dtype=bfloat16"])
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(rng.integers(0, 257, size=(2, 13)))

  def loss(params):
    logits, aux = nnx.merge(graphdef, params)(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + aux["dsa_kl"]

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_backward_never_holds_the_whole_gather():
  """The chunks are rematerialised: the compiled backward's scratch memory stays well
  below the [B, T, K, C+R] gather (autodiff of the chunk scan alone keeps ~2x of it)."""
  B, T, H, C, R, K, Q = 1, 1024, 2, 64, 16, 64, 64
  z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
  idx, valid = jnp.zeros((B, T, K), jnp.int32), jnp.ones((B, T, K), bool)

  def loss(q_lat, q_rope, c, kr):
    return dsa.sparse_mla(q_lat, q_rope, c, kr, idx, valid, scale=0.1, chunk=Q)[0].sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
      z(B, T, H, C), z(B, T, H, R), z(B, T, C), z(B, T, R)).compile()
  whole_gather = B * T * K * (C + R) * 4
  assert compiled.memory_analysis().temp_size_in_bytes < whole_gather / 3


# ----------------------------------------------------------------------------- the kernel


def _kernel_problem(rng, dtype, B, T, H, C, R, K):
  """Random keys per query (repeats allowed), valid iff causal; slot 0 is the query itself,
  and a few queries keep only it (the ragged causal edge)."""
  f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
  q_lat, q_rope, c, kr = f(B, T, H, C), f(B, T, H, R), f(B, T, C), f(B, T, R)
  t_T = np.arange(T)
  idx = rng.integers(0, T, size=(B, T, K))
  idx[:, :, 0] = t_T
  valid = idx <= t_T[None, :, None]
  valid[:, rng.integers(0, T, size=2), 1:] = False
  return (q_lat, q_rope, c, kr), jnp.asarray(idx, jnp.int32), jnp.asarray(valid)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.isfinite(a).all()
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("dtype,C,R,K,tol,impl,probs", [
    (jnp.bfloat16, 128, 64, 100, 1e-2, "interpret", "kernel"),
    (jnp.float32, 64, 32, 70, 1e-5, "interpret", "kernel"),
    (jnp.bfloat16, 128, 64, 100, 1e-2, "interpret_mma", "kernel"),
    (jnp.bfloat16, 128, 64, 100, 1e-2, "interpret_mma_bwd", "steps")])  # (p's forms: alike
    # with and without the backward kernel: one case each)
def test_sparse_mla_kernel_interpreted_equals_reference(rng, dtype, C, R, K, tol, impl, probs):
  """The Mosaic GPU kernels (wgmma; "interpret_mma": the 16-row MMA one, bf16 only) in the
  GPU interpreter: o_lat, p and the gradients (the custom VJP's pure-JAX backward from the
  LSE; "interpret_mma_bwd": the MMA kernel's backward kernel; p from the forward's steps
  with probs="steps") against impl="reference" in
  float32 on the same inputs (in bf16 the reference's own gradient of c is off by ~3%: its
  dp is rounded to bf16 before the softmax backward); two batch rows (the gather's sequence
  offset), K over one 64-key step (the online softmax across steps), chunks that pad T."""
  B, T, H = 2, 5, 16
  args, idx, valid = _kernel_problem(rng, dtype, B, T, H, C, R, K)
  g_out = jnp.asarray(rng.normal(size=(B, T, H, C)), jnp.float32)

  def run(impl, args):
    def loss(*a):
      o, p = dsa.sparse_mla(*a, idx, valid, scale=0.1, chunk=4, impl=impl, _probs=probs)
      return jnp.sum(o.astype(jnp.float32) * g_out), (o, p)
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)

  grads, (o, p) = run(impl, args)
  grads_r, (o_r, p_r) = run("reference", [a.astype(jnp.float32) for a in args])
  assert _rel(o, o_r) < tol
  assert _rel(p, p_r) < tol
  for a, b in zip(grads, grads_r):
    assert _rel(a, b) < tol


def test_sparse_mla_kernel_variants_agree_and_are_race_free(rng):
  """Both splits of C (two warpgroups sharing a gather, or two CTAs; with 1 and 3 column
  tiles per TMA copy) give the same o_lat and LSE, equal to the reference, and the GPU
  interpreter's race detector finds no race (the warpgroups' k_ready / k_consumed / done
  handshakes); three 64-key steps."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax.experimental.pallas import mosaic_gpu as plgpu

  from pallas_kernels import sparse_mla_gpu

  (q_lat, q_rope, c, kr), idx, valid = _kernel_problem(rng, jnp.bfloat16, 1, 3, 16, 128, 64,
                                                       130)
  ckr, idx_enc = jnp.concatenate([c, kr], -1), jnp.where(valid, idx, -1)
  params = plgpu.InterpretGPUParams(detect_races=True)
  outs = []
  # each split once, each with another copy size (the four pairs took 22 s of the suite)
  for split, tiles_per_copy in zip(sparse_mla_gpu.SPLITS, (1, 3)):
    outs.append(sparse_mla_gpu.sparse_mla_fwd(q_lat, q_rope, ckr, idx_enc, scale=0.1,
                                              split=split, tiles_per_copy=tiles_per_copy,
                                              interpret=params))
    assert not gpu_callbacks.get_races().races_found, (split, tiles_per_copy)
  for o, lse in outs[1:]:
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(outs[0][0], np.float32))
    np.testing.assert_array_equal(lse, outs[0][1])
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  o_r, _ = dsa.sparse_mla(f32(q_lat), f32(q_rope), f32(c), f32(kr), idx, valid, scale=0.1,
                          chunk=4)
  assert _rel(outs[0][0], o_r) < 1e-2


def test_model_with_the_kernel_interpreted_equals_reference(rng):
  """model.dsa_impl=interpret (the kernel in the GPU interpreter) through the model: logits,
  the indexer KL and the parameter gradients equal dsa_impl=reference (float32; 8 heads,
  latent 64, rope 32: shapes the kernel takes)."""
  shapes = ["model.num_heads=8", "model.kv_lora_rank=64", "model.qk_rope_head_dim=32",
            "model.num_layers=1", "model.dsa_topk=4", "train.dsa_stage=sparse"]
  seed = int(rng.integers(1 << 30))
  tokens = jnp.asarray(rng.integers(1, 257, size=(1, 6)))

  def run(impl):
    cfg = load_config("configs/tiny.yaml", TINY + shapes + [f"model.dsa_impl={impl}"])
    model = Transformer(cfg, rngs=nnx.Rngs(seed))

    def loss(model):
      logits, aux = model(tokens, None, None)
      return jnp.mean(logits ** 2) + aux["dsa_kl"], (logits, aux["dsa_kl"])
    (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return out, jax.tree.leaves(nnx.state(grads, nnx.Param))

  (logits, kl), grads = run("interpret")
  (logits_r, kl_r), grads_r = run("reference")
  np.testing.assert_allclose(logits, logits_r, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(kl, kl_r, rtol=1e-4, atol=1e-6)
  for a, b in zip(grads, grads_r):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)


def test_sparse_mla_kernel_refuses_unsupported_shapes(rng):
  args, idx, valid = _kernel_problem(rng, jnp.bfloat16, 1, 3, 12, 128, 64, 2)
  with pytest.raises(ValueError, match="heads must be a multiple of 8"):
    dsa.sparse_mla(*args, idx, valid, scale=0.1, chunk=4, impl="pallas")
  assert dsa.resolve_sparse_mla_impl("auto", 12, 128, 64, 2, jnp.bfloat16) == "reference"
  with pytest.raises(ValueError, match="selected keys K must be between 1 and 16384"):
    dsa.resolve_sparse_mla_impl("pallas", 16, 512, 64, 16448, jnp.bfloat16)
  with pytest.raises(ValueError, match="latent dim C must be a multiple of 128"):
    dsa.resolve_sparse_mla_impl("interpret", 16, 64, 64, 2048, jnp.bfloat16)


def test_auto_uses_the_kernel_on_one_device_only(monkeypatch):
  """dsa_impl=auto on a Hopper GPU (faked): the kernels without a mesh or on a one-device
  mesh (the MMA ones at 16 heads in bf16, else the wgmma forward: 32 heads, float32), the
  reference where neither applies (12 heads) or under a mesh of several devices (whose
  partitioner would gather the kernel's operands onto each of them), the kernels again
  inside a shard_map over that mesh (`sparse_stage`'s)."""
  import pallas_kernels as pk
  monkeypatch.setattr(pk, "resolve_backend", lambda b="auto": "mosaic_gpu")
  shapes = (16, 512, 64, 2048, jnp.bfloat16)
  assert dsa.resolve_sparse_mla_impl("auto", *shapes) == "pallas_mma_bwd"
  assert dsa.resolve_sparse_mla_impl("auto", 32, 512, 64, 2048, jnp.bfloat16) == "pallas"
  assert dsa.resolve_sparse_mla_impl("auto", 16, 512, 64, 2048, jnp.float32) == "pallas"
  assert dsa.resolve_sparse_mla_impl("auto", 12, 512, 64, 2048, jnp.bfloat16) == "reference"
  with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
    assert dsa.resolve_sparse_mla_impl("auto", *shapes) == "pallas_mma_bwd"
  with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2],
                                  axis_types=(jax.sharding.AxisType.Auto,))):
    assert dsa.resolve_sparse_mla_impl("auto", *shapes) == "reference"
    assert dsa.resolve_sparse_mla_impl("pallas", *shapes) == "pallas"  # asked for: as asked
    # inside sparse_stage's shard_map over the mesh the kernels take whole (local) arrays
    resolved = []

    def body(x):
      resolved.append(dsa.resolve_sparse_mla_impl("auto", *shapes))
      return x
    jax.jit(jax.shard_map(body, in_specs=P("data"), out_specs=P("data")))(jnp.zeros(4))
    assert resolved == ["pallas_mma_bwd"]


def _stage_inputs(rng, B, T, H=4, C=32, R=16, J=2, I=16):
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return (f(B, T, H, C), f(B, T, H, R), f(B, T, C), f(B, T, R), f(B, T, J, I), f(B, T, J),
          f(B, T, I))


@pytest.mark.parametrize("method,segments,devices", [("sort", True, (2, 2)),
                                                     ("fused", False, (4, 1))])
def test_sparse_stage_per_batch_shard_equals_one_device(rng, monkeypatch, method, segments,
                                                        devices):
  """sparse_stage under a mesh that splits the batch (data x fsdp = 2 x 2 or 4 x 1: its
  shard_map, every device its rows) against no mesh: o_lat, the KL and the gradients in all
  seven inputs to float32 rounding (sums in another order), with segment ids or none; "fused": the fused top-k's
  Triton kernels in the interpreter inside the shard_map. A mesh with a tensor axis, or a
  batch the devices do not divide, or a trace inside a shard_map already: no shard_map."""
  from mohge_jax import sharding
  from mohge_jax.config import MeshConfig

  monkeypatch.setattr(dsa, "_indexer_backend", lambda: "interpret")
  B, T = 4, 40
  args = _stage_inputs(rng, B, T)
  seg = jnp.asarray(np.repeat([[0] * 15 + [1] * (T - 15)], B, 0)) if segments else None

  def run():
    def loss(*a):
      o, kl = dsa.sparse_stage(*a, seg, topk=8, chunk=16, method=method, impl="reference",
                               scale=0.1)
      return jnp.sum(o ** 2) + jnp.sum(kl), (o, kl)
    return jax.jit(jax.grad(loss, argnums=tuple(range(7)), has_aux=True))(*args)
  want_g, want = run()
  mesh = sharding.make_mesh(MeshConfig(data=devices[0], fsdp=devices[1], expert=1, tensor=1),
                            jax.devices()[:4])
  with jax.set_mesh(mesh):
    assert dsa._batch_shard_mesh(B) is not None
    got_g, got = run()
  for name, a, b in zip(("o_lat", "kl", "dq_lat", "dq_rope", "dc", "dk_rope", "dq_I", "dw_I",
                         "dk_I"), got + got_g, want + want_g):
    # (float32 sums in another order: seen 2.8e-5 relative on one element of 5120)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6 * float(np.abs(b).max()), err_msg=name)
  for cfg, batch in ((MeshConfig(data=2, fsdp=1, expert=1, tensor=2), B),
                     (MeshConfig(data=4, fsdp=1, expert=1, tensor=1), 6)):
    with jax.set_mesh(sharding.make_mesh(cfg, jax.devices()[:4])):
      assert dsa._batch_shard_mesh(batch) is None


@pytest.mark.gpu
def test_sparse_stage_on_two_gpus_equals_one_gpu(rng):
  """On 2 Hopper GPUs (mesh data = 2, batch 2): sparse_stage with the defaults of the 3B DSA
  config (dsa_impl auto: the MMA kernels, the fused top-k, the selected scores' kernel) per
  batch shard against the same on one GPU, at its attention shapes (16 heads, latent 512 +
  rope 64, 4 x 64 indexer, top-2048 of 4096 keys, bf16): o_lat and the KL, and the
  gradients in all seven inputs (the kernels' float32 atomics add in another order each
  run: within 1e-2, relative norm). Run: JAX_PLATFORMS=cuda,cpu pytest -m gpu ..."""
  import pallas_kernels as pk
  from mohge_jax import sharding
  from mohge_jax.config import MeshConfig

  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if len(gpus) < 2 or pk.resolve_backend("auto") != "mosaic_gpu":
    pytest.skip(f"needs 2+ Hopper GPUs (found {len(gpus)})")
  B, T, H, C, R, J, I = 2, 4096, 16, 512, 64, 4, 64
  key = iter(jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 8))
  bf = lambda *s: jax.random.normal(next(key), s, jnp.bfloat16)  # noqa: E731
  args = (bf(B, T, H, C), bf(B, T, H, R), bf(B, T, C), bf(B, T, R), bf(B, T, J, I),
          jax.random.normal(next(key), (B, T, J), jnp.float32), bf(B, T, I))
  ct = bf(B, T, H, C).astype(jnp.float32)

  def loss(*a):
    o, kl = dsa.sparse_stage(*a, None, topk=2048, chunk=256, method="fused", impl="auto",
                             scale=0.04)
    return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(kl), (o, kl)
  step = jax.jit(jax.grad(loss, argnums=tuple(range(7)), has_aux=True))
  results = []
  for n in (1, 2):
    mesh = sharding.make_mesh(MeshConfig(data=n), gpus[:n])
    with jax.set_mesh(mesh):
      assert (dsa._batch_shard_mesh(B) is not None) == (n > 1)
      grads, (o, kl) = step(*[jax.device_put(a, sharding.batch_sharding(mesh, leading=0))
                              for a in args])
    results.append([np.asarray(x, np.float32) for x in (o, kl, *grads)])
  for name, a, b in zip(("o_lat", "kl", "dq_lat", "dq_rope", "dc", "dk_rope", "dq_I", "dw_I",
                         "dk_I"), *results):
    assert np.isfinite(a).all(), name
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b), name


def test_sparse_mla_kernel_lowers_for_cuda_at_mohge_3b_shapes():
  """Mosaic GPU lowering (no GPU needed; it checks the SMEM budget, not registers) at
  H = 16, C = 512, R = 64, K = 2048, T = 128k: the forward kernel alone (both splits, 1 or 3
  column tiles per copy), and the model's use (o_lat and p, gradients) at T = 4096."""
  from pallas_kernels import sparse_mla_gpu

  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  H, C, R, K = 16, 512, 64, 2048
  for T, split, tiles_per_copy in ((131072, "warpgroup", 1), (16384, "warpgroup", 3),
                                   (131072, "cta", 1), (16384, "cta", 3)):
    fwd = jax.jit(lambda *a, tpc=tiles_per_copy, split=split: sparse_mla_gpu.sparse_mla_fwd(
        *a, scale=0.04, tiles_per_copy=tpc, split=split))
    fwd.trace(sds((1, T, H, C), bf), sds((1, T, H, R), bf), sds((1, T, C + R), bf),
              sds((1, T, K), jnp.int32)).lower(lowering_platforms=("cuda",))
  T = 4096

  def loss(q_lat, q_rope, c, kr, idx, valid):
    o, p = dsa.sparse_mla(q_lat, q_rope, c, kr, idx, valid, scale=0.04, chunk=256,
                          impl="pallas")
    return o.astype(jnp.float32).sum() + p.sum()

  jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
      sds((1, T, H, C), bf), sds((1, T, H, R), bf), sds((1, T, C), bf), sds((1, T, R), bf),
      sds((1, T, K), jnp.int32), sds((1, T, K), bool)).lower(lowering_platforms=("cuda",))
