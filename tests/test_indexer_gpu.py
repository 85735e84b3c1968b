"""pallas_kernels/indexer_gpu.py, the indexer's scores and the threshold top-k's
candidates in one Triton kernel, and `sparse_attention.top_k_fused` / `select_topk(method=
"fused")` around it: in the Pallas interpreter against the XLA reference and against
`top_k_threshold` (exactly: inputs whose scores are exact in float32, so that the kernel's
and XLA's sums agree to the bit), its CUDA lowering at MoHGE-3B's shapes; on a GPU against
the XLA top-k (skipped without one)."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mohge_jax import sparse_attention as dsa
from pallas_kernels import indexer_gpu as ik


def _exact(rng, shape, bound, scale, dtype=jnp.bfloat16):
  """Integers in [-bound, bound] times a power of two: products and the indexer's sums of
  them are exact in float32 at these sizes (with I = 16, |q . k| < 2^16 units of 2^-8 and
  w . ReLU summed over 4 heads < 2^21 units: within float32's 24 bits)."""
  return jnp.asarray(rng.integers(-bound, bound + 1, shape) * scale, jnp.float32).astype(dtype)


def _indexer(rng, B, N, S, J=4, I=16):
  return (_exact(rng, (B, N, J, I), 63, 2 ** -4), _exact(rng, (B, N, J), 7, 1.0, jnp.float32),
          _exact(rng, (B, S, I), 63, 2 ** -4))


@pytest.mark.parametrize("segments", [False, True])
def test_candidates_interpreted_equal_reference(rng, segments):
  """Positions, order keys and counts against the XLA reference: a ragged number of
  queries and keys (padding to 64), causal rows that start before, inside and past the
  key segments (1024), an extent short of the keys, a cap that cuts rows off (counts
  still whole), document segments."""
  B, N, S = 2, 70, 1100
  q, w, k = _indexer(rng, B, N, S)
  q, w = jnp.swapaxes(q, 1, 2), jnp.swapaxes(w, 1, 2)
  # thresholds around the middle of the scores' order keys (2^31 is +0.0)
  tau = jnp.asarray(rng.integers(2 ** 31 - 2 ** 28, 2 ** 31 + 2 ** 30, (B, N)), jnp.uint32)
  # one document id per position (a boundary every ~50 positions); the queries' ids are the
  # ids at their positions, as in a packed sequence
  doc = np.cumsum(rng.random((B, 1000 + N)) < 0.02, 1).astype(np.int32)
  for t0, extent, cap in ((1000, 1050, 64), (0, 1024, 1024), (300, 1100, 300)):
    seg = ((jnp.asarray(doc[:, t0:t0 + N]), jnp.asarray(np.pad(doc, ((0, 0), (0, 30)),
                                                                 mode="edge")[:, :S]))
           if segments else (None, None))
    got = ik.threshold_candidates(q, w, k, tau, t0, *seg, extent=extent, cap=cap,
                                  interpret=True)
    want = ik.reference(q, w, k, tau, t0, *seg, extent=extent, cap=cap)
    assert int(want[2].max()) > 0
    for name, a, b in zip(("pos", "key", "count"), got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name}, t0={t0}")


def test_candidates_refuse_bad_arguments(rng):
  q, w, k = _indexer(rng, 1, 64, 128)
  q, w = jnp.swapaxes(q, 1, 2), jnp.swapaxes(w, 1, 2)
  tau = jnp.zeros((1, 64), jnp.uint32)
  with pytest.raises(ValueError, match="extent=200"):
    ik.threshold_candidates(q, w, k, tau, 0, extent=200, cap=64, interpret=True)
  with pytest.raises(ValueError, match="segment ids"):
    ik.threshold_candidates(q, w, k, tau, 0, jnp.zeros((1, 64), jnp.int32), extent=128,
                            cap=64, interpret=True)
  with pytest.raises(ValueError, match="power of two >= 16, got 8"):
    ik.threshold_candidates(q[..., :8], w, k[..., :8], tau, 0, extent=128, cap=64,
                            interpret=True)
  with pytest.raises(ValueError, match="impl='interpret': the indexer kernels need"):
    dsa.top_k_fused(jnp.swapaxes(q, 1, 2)[..., :12], jnp.swapaxes(w, 1, 2), k[..., :12], 0, 8,
                    impl="interpret")


def _keys_with_ties(rng, N, M):
  key = rng.integers(0, 2 ** 32, (N, M), dtype=np.uint64).astype(np.uint32)
  key[:, 10:40] = key[:, 5:6]  # a tie of 31 in every row
  key[1] = 7                   # a row of one value
  key[2, :M // 2] = 0          # the lowest key, as the padding's
  return jnp.asarray(key)


def test_row_selects_interpreted_equal_radix(rng):
  """kth_largest = `_kth_key` and top_positions = `_top_positions` (and of given
  positions) exactly, on rows with ties, a constant row, zero keys, lengths that are not a
  power of two (padded with key 0), k = 1 and k = the row's length."""
  for N, M, k in ((5, 100, 7), (3, 256, 256), (4, 300, 1)):
    key = _keys_with_ties(rng, N, M)
    pos = jnp.asarray(rng.integers(0, 10 ** 6, (N, M)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(ik.kth_largest(key, k, interpret=True)),
                                  np.asarray(dsa._kth_key(key, k)))
    want = dsa._top_positions(key, k)
    np.testing.assert_array_equal(np.asarray(ik.top_positions(key, k, interpret=True)),
                                  np.asarray(want))
    np.testing.assert_array_equal(np.asarray(ik.top_positions(key, k, pos, interpret=True)),
                                  np.asarray(jnp.take_along_axis(pos, want, 1)))
  with pytest.raises(ValueError, match="k=9, rows of 8"):
    ik.kth_largest(key[:, :8], 9, interpret=True)


@pytest.mark.parametrize("impl", ["interpret", "reference"])
def test_top_k_fused_equals_threshold(rng, impl):
  """top_k_fused = top_k_threshold of the masked scores, exactly, for a chunk whose rows
  all take the candidates' path (checked: their counts are between k and the cap) and for
  one whose first rows have fewer keys than the sample's quota (the whole-row fallback);
  rows of at most cap keys go to the radix select directly."""
  B, Q, S, K = 2, 64, 1536, 16
  q, w, k = _indexer(rng, B, Q, S)
  w = jnp.abs(w) + 1  # positive head weights: a zero score is the lowest, rarely the k-th
  for t0 in (S - Q, 40):
    s = dsa.index_scores(q, w, k)
    ok = dsa._allowed(t0, Q, jnp.arange(S, dtype=jnp.int32), None, None)
    masked = jnp.where(ok, s, -jnp.inf).reshape(B * Q, S)
    want = dsa.top_k_threshold(masked, K, sample=768, cap_factor=8).reshape(B, Q, K)
    got = dsa.top_k_fused(q, w, k, t0, K, sample=768, cap_factor=8, impl=impl)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"t0={t0}")
    if t0 == S - Q:  # the candidates' path: every row between k and the cap
      key = dsa._order_key(masked)
      tau = dsa._kth_key(key[:, ::2], K)  # stride 1536 // 768, quota 2 K / 2
      count = jnp.sum(key >= tau[:, None], axis=1)
      assert bool(jnp.all((count >= K) & (count <= 8 * K)))
  short = dsa.top_k_fused(q, w, k[:, :128], S - Q, K, cap_factor=8, impl=impl)
  want = dsa.top_k_positions(dsa.index_scores(q, w, k[:, :128]).reshape(B * Q, 128), K)
  np.testing.assert_array_equal(np.asarray(short), np.asarray(want).reshape(B, Q, K))


def test_top_k_fused_takes_the_xla_radix_past_a_kernel_row(rng, monkeypatch):
  """Rows longer than the row kernels hold (MAX_ROW, here made 64: the sample's 768 keys,
  the 128 candidates' buffer) take the XLA radix: the same keys as top_k_threshold."""
  monkeypatch.setattr(ik, "MAX_ROW", 64)
  B, Q, S, K = 1, 64, 1536, 16
  q, w, k = _indexer(rng, B, Q, S)
  w = jnp.abs(w) + 1
  ok = dsa._allowed(S - Q, Q, jnp.arange(S, dtype=jnp.int32), None, None)
  s = jnp.where(ok, dsa.index_scores(q, w, k), -jnp.inf).reshape(B * Q, S)
  want = dsa.top_k_threshold(s, K, sample=768, cap_factor=8).reshape(B, Q, K)
  got = dsa.top_k_fused(q, w, k, S - Q, K, sample=768, cap_factor=8, impl="interpret")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="rows of 128"):  # what the fallback avoids
    ik.top_positions(jnp.zeros((2, 128), jnp.uint32), 16, interpret=True)


def test_select_topk_fused_equals_threshold(rng):
  """select_topk(method="fused") against method="threshold": the same keys, valid flags
  and (differentiable) scores, over causal bands and chunks, with documents (the kernel's
  segment masks; without them in the tests above)."""
  B, T, K = 2, 384, 8
  q, w, k = _indexer(rng, B, T, T)
  seg = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.006, axis=1), jnp.int32)
  want = dsa.select_topk(q, w, k, topk=K, chunk=128, method="threshold", segment_ids_BxT=seg)
  got = dsa.select_topk(q, w, k, topk=K, chunk=128, method="fused", segment_ids_BxT=seg,
                        fused_impl="interpret", fused_chunk=128)
  for name, a, b in zip(("idx", "valid", "score"), got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _distinct_keys(rng, B, T, S, K):
  """Each query's K distinct keys (as a top-k's), in a random order."""
  return jnp.asarray(np.argsort(rng.random((B, T, S)), -1)[..., :K], jnp.int32)


@pytest.mark.parametrize("K", [24, 256])
def test_selected_scores_interpreted_equal_reference(rng, K):
  """selected_scores and its gradients in q, w and k (the keys' by atomics) against the
  XLA gather: K = 24 (8 keys a step) and 256 (two steps of 128), bf16 q and k."""
  B, T, J, I, S = 2, 20, 4, 16, 300
  q = jnp.asarray(rng.normal(size=(B, T, J, I)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(B, T, J)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, S, I)), jnp.bfloat16)
  idx = _distinct_keys(rng, B, T, S, K)
  g = jnp.asarray(rng.normal(size=(B, T, K)), jnp.float32)

  def loss(fn):
    return lambda q, w, k: jnp.sum(fn(q, w, k, idx) * g)
  kern = lambda *a: ik.selected_scores(*a, interpret=True)  # noqa: E731
  np.testing.assert_allclose(np.asarray(kern(q, w, k, idx)),
                             np.asarray(ik.selected_scores_reference(q, w, k, idx)),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(kern), (0, 1, 2))(q, w, k)
  # the reference on the same values in float32: XLA's gradient of a bf16 gather adds the
  # keys' contributions in bf16 (a scatter-add), the kernel in float32, rounded once
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  want = jax.grad(loss(ik.selected_scores_reference), (0, 1, 2))(f32(q), w, f32(k))
  for name, a, b, like in zip(("dq", "dw", "dk"), got, want, (q, w, k)):
    assert a.dtype == like.dtype, name
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=1e-2,
                               atol=1e-2 * np.abs(b).max(), err_msg=name)
  with pytest.raises(ValueError, match="power of two"):
    ik.selected_scores(q[..., :12], w, k[..., :12], idx, interpret=True)


def test_select_topk_kernel_scores_equal_gather(rng):
  """select_topk(scores="interpret") against scores="gather": the same keys and valid
  flags, the scores and their gradients in the indexer's outputs equal up to float32
  summation order."""
  B, T, K = 1, 128, 16
  q, w, k = _indexer(rng, B, T, T)

  def run(scores, q, k):
    def loss(q, w, k):
      _, valid, score = dsa.select_topk(q, w, k, topk=K, chunk=64, method="threshold",
                                        scores=scores)
      return jnp.sum(jnp.where(valid, jnp.sin(score), 0.0))
    return dsa.select_topk(q, w, k, topk=K, chunk=64, method="threshold", scores=scores), \
        jax.grad(loss, (0, 1, 2))(q, w, k)
  # "gather" on the same values in float32 (its bf16 gradient adds in bf16, see above)
  (sel_a, grad_a) = run("interpret", q, k)
  (sel_b, grad_b) = run("gather", q.astype(jnp.float32), k.astype(jnp.float32))
  for name, a, b in zip(("idx", "valid", "score"), sel_a, sel_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)  # exact inputs
  for name, a, b in zip(("dq", "dw", "dk"), grad_a, grad_b):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=1e-2,
                               atol=1e-2 * np.abs(b).max(), err_msg=name)


def test_lowers_for_cuda_at_mohge_3b_shapes():
  """The Triton kernels lower (jax's Pallas-to-Triton rules; ptxas runs only on a GPU) at
  MoHGE-3B DSA's shapes (4 indexer heads x 64, a 2048-query chunk over 64k keys, cap 8 x
  2048), with and without segment ids. The lowering asks for the GPU's compute capability:
  an H100's is given here."""
  from jax._src.lib.triton import dialect as tt_dialect
  from jax._src.pallas.triton import gpu_info, lowering as tl, pallas_call_registration as reg

  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion("NVIDIA H100"))
  sds = jax.ShapeDtypeStruct
  B, J, N, I, S = 1, 4, 2048, 64, 65536
  for segments in (False, True):
    args = [sds((B, J, N, I), jnp.bfloat16), sds((B, J, N), jnp.float32),
            sds((B, S, I), jnp.bfloat16), sds((B, N), jnp.uint32), sds((), jnp.int32)]
    if segments:
      args += [sds((B, N), jnp.int32), sds((B, S), jnp.int32)]
    with mock.patch.object(reg.gpu_info_lib, "get_gpu_info", lambda: info):
      text = jax.jit(lambda *a: ik.threshold_candidates(*a, extent=S, cap=8 * 2048)).trace(
          *args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("dsa_index_count") and text.count("dsa_index_candidates")
  for M, positions in ((8192, False), (16384, True)):  # the sample's and the candidates'
    args = [sds((N, M), jnp.uint32)] + ([sds((N, M), jnp.int32)] if positions else [])
    fn = ((lambda key, pos: ik.top_positions(key, 2048, pos)) if positions
          else (lambda key: ik.kth_largest(key, 512)))
    with mock.patch.object(reg.gpu_info_lib, "get_gpu_info", lambda: info):
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("dsa_topk_rows" if positions else "dsa_kth_rows")
  T = 4096  # the selected scores and their backward (atomics), K = 2048
  args = (sds((B, T, J, I), jnp.bfloat16), sds((B, T, J), jnp.float32),
          sds((B, T, I), jnp.bfloat16), sds((B, T, 2048), jnp.int32))
  fb = lambda q, w, k, idx: jax.grad(  # noqa: E731
      lambda q, w, k: jnp.sum(ik.selected_scores(q, w, k, idx)), (0, 1, 2))(q, w, k)
  sems, rmw = [], tl._atomic_rmw  # the backward's adds: Triton atomics, relaxed ordering

  def spy(*a, **kw):
    sems.append(kw.get("semantic"))
    return rmw(*a, **kw)
  with mock.patch.object(reg.gpu_info_lib, "get_gpu_info", lambda: info), \
       mock.patch.object(tl, "_atomic_rmw", spy):
    text = jax.jit(fb).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("dsa_selected_scores") and text.count("dsa_selected_scores_bwd")
  assert sems and all(s == tt_dialect.MemSemantic.RELAXED for s in sems), sems


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_kernel_selects_the_top_k_on_the_gpu(rng):
  """On the GPU: the row selects against the XLA radix exactly (rows of 16k keys with
  ties); at a MoHGE-3B DSA chunk (2048 queries at 30k-32k over 32k keys, 4 x 64 indexer,
  top-2048, bf16 random inputs) the selected scores' kernels (value and gradients within 1%
  of the XLA gather's in float32: bf16 gradients), the candidates' kernel against the XLA
  reference (their scores' float32 sums may differ in the last bit: counts within a few,
  positions equal where the counts are), and select_topk(method="fused") against
  method="threshold": the same keys for nearly every query, and every key chosen by one
  and not the other within 1e-5 of the k-th score."""
  keys = _keys_with_ties(rng, 64, 16384)
  pos = jnp.asarray(rng.integers(0, 10 ** 6, keys.shape), jnp.int32)
  np.testing.assert_array_equal(np.asarray(ik.kth_largest(keys, 4096)),
                                np.asarray(dsa._kth_key(keys, 4096)))
  np.testing.assert_array_equal(np.asarray(ik.top_positions(keys, 2048, pos)), np.asarray(
      jnp.take_along_axis(pos, dsa._top_positions(keys, 2048), 1)))

  B, T, J, I, K = 1, 32768, 4, 64, 2048
  key = jax.random.split(jax.random.key(int(rng.integers(2 ** 31))), 3)
  q = jax.random.normal(key[0], (B, T, J, I), jnp.bfloat16)
  w = jax.random.normal(key[1], (B, T, J), jnp.float32)
  k = jax.random.normal(key[2], (B, T, I), jnp.bfloat16)
  t0 = T - 2048
  qc, wc = jnp.swapaxes(q[:, t0:], 1, 2), jnp.swapaxes(w[:, t0:], 1, 2)
  s = dsa.index_scores(q[:, t0:], w[:, t0:], k)
  tau = dsa._kth_key(dsa._order_key(s[0]), 2 * K)[None]
  got = ik.threshold_candidates(qc, wc, k, tau, t0, extent=T, cap=8 * K)
  want = ik.reference(qc, wc, k, tau, t0, extent=T, cap=8 * K)
  assert int(jnp.max(jnp.abs(got[2] - want[2]))) <= 4
  same = np.asarray(got[2] == want[2])[0]
  assert same.mean() > 0.9
  np.testing.assert_array_equal(np.asarray(got[0])[0][same], np.asarray(want[0])[0][same])

  idx = _distinct_keys(rng, 1, 4096, T, K)  # the selected scores: 4096 queries over 32k
  g = jax.random.normal(key[0], idx.shape, jnp.float32)
  qs, ws = q[:, :4096], w[:, :4096]
  for fn, dt in ((ik.selected_scores, jnp.bfloat16),
                 (ik.selected_scores_reference, jnp.float32)):  # its bf16 grad adds in bf16
    val, grads = jax.jit(jax.value_and_grad(
        lambda q, w, k: jnp.sum(fn(q, w, k, idx) * g), (0, 1, 2)))(qs.astype(dt), ws,
                                                                     k.astype(dt))
    if fn is ik.selected_scores:
      got = [val] + list(grads)
  for name, a, b in zip(("value", "dq", "dw", "dk"), got, [val] + list(grads)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b), name

  sel = jax.jit(lambda m: dsa.select_topk(q, w, k, topk=K, chunk=256, method=m)[:2],
                static_argnums=0)
  (i_f, v_f), (i_t, v_t) = sel("fused"), sel("threshold")
  assert bool(jnp.all(v_f == v_t))
  differ = np.asarray(jnp.any(i_f != i_t, axis=-1))[0]
  assert differ.mean() < 0.01
  scores = np.asarray(dsa.index_scores(q, w, k)[0], np.float64)
  for t in np.nonzero(differ)[0][:32]:
    a, b = set(np.asarray(i_f)[0, t]), set(np.asarray(i_t)[0, t])
    kth = np.sort(scores[t, :t + 1])[::-1][K - 1]
    for s_ in a ^ b:
      assert abs(scores[t, s_] - kth) <= 1e-5 * max(1.0, abs(kth))
