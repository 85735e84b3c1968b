"""pallas_kernels/splitk_gpu.py, decode's dense projections split over K in a thread-block
cluster: the kernel in the GPU interpreter (one split: it has no clusters) against float64,
its CUDA lowering here at every split, the shape checks and split choice; on a Hopper GPU
(skipped without one) every split at MLA decode's shapes against float64, the same bits in
two runs, and MLA's decode step through it against XLA's products."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from pallas_kernels import splitk_gpu as sk

ROOT = Path(__file__).resolve().parents[1]
HOPPER = pk.resolve_backend("auto") == "mosaic_gpu"
# MoHGE-3B's decode projections at batch 256 (K, N, the split pick_splits takes):
# MLA's input [1024, 3648], q_nope's [1024, 2048], the output [2048, 1024]
SHAPES_3B = [(1024, 3648, 2), (1024, 2048, 4), (2048, 1024, 8)]


def _operands(rng, M, K, N, dtype=jnp.bfloat16):
  x = jnp.asarray(rng.standard_normal((M, K)), dtype)
  w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dtype)
  return x, w


def _check(y, x, w):
  """Against float64 of the same bf16 inputs: within one rounding of the output (the
  float32 sum's order is the only other difference)."""
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  got = np.asarray(y, np.float64)
  assert y.shape == want.shape and y.dtype == x.dtype
  np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("M,K,N,depth", [(64, 256, 64, 3), (128, 512, 192, 2),
                                          (256, 384, 128, 3), (192, 128, 64, 4)])
def test_interpreter_matches_float64(rng, M, K, N, depth):
  """One split (the interpreter has no clusters): the ring of `depth` slots over K (fewer
  steps than slots, more, a multiple), every 64-row tile of the output, several column
  tiles."""
  x, w = _operands(rng, M, K, N)
  _check(sk.splitk_matmul(x, w, splits=1, depth=depth, interpret=True), x, w)
  _check(sk.reference(x, w), x, w)   # the pure-JAX form the kernel replaces


@pytest.mark.parametrize("M,K,N,splits", [
    (256, 2048, 1024, 8), (256, 1024, 3648, 2), (128, 1024, 2048, 4), (64, 512, 128, 1)])
def test_lowers_for_cuda(M, K, N, splits):
  """The cluster's CUDA lowering here (Mosaic GPU needs no GPU to lower): every split of
  MoHGE-3B's decode projections and smaller batches."""
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((M, K), (K, N))]
  text = jax.jit(lambda x, w: sk.splitk_matmul(x, w, splits=splits)).trace(
      *args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_refuses_what_it_cannot_run(rng):
  x, w = _operands(rng, 256, 1024, 3648)
  for kw, match in ((dict(splits=16), "splits=16"), (dict(splits=2, bn=96), "bn=96"),
                    (dict(splits=4, bk=64, depth=8), "SMEM")):
    with pytest.raises(ValueError, match=match):
      sk.splitk_matmul(x, w, **kw)
  with pytest.raises(ValueError, match="rows M=100"):
    sk.splitk_matmul(x[:100], w, splits=1)
  with pytest.raises(ValueError, match="columns N=3600"):
    sk.splitk_matmul(x, w[:, :3600], splits=1)
  with pytest.raises(ValueError, match="contraction K=1024"):
    sk.splitk_matmul(x, w, splits=8, bk=256)
  with pytest.raises(ValueError, match="do not multiply"):
    sk.splitk_matmul(x, w.astype(jnp.float16), splits=1)
  with pytest.raises(ValueError, match="float32"):
    sk.splitk_matmul(x.astype(jnp.float32), w.astype(jnp.float32), splits=1)
  with pytest.raises(ValueError, match="interpreter"):
    sk.splitk_matmul(x, w, splits=2, interpret=True)


def test_pick_splits_fills_the_sms_once():
  """The most splits whose clusters all fit on 132 SMs at once, among those the shapes
  take: MoHGE-3B's projections at batch 256 (114, 128 and 128 CTAs)."""
  for K, N, want in SHAPES_3B:
    assert sk.pick_splits(256, K, N, jnp.bfloat16) == want
  assert sk.pick_splits(256, 1024, 8192, jnp.bfloat16) == 1   # 128 column tiles
  assert sk.pick_splits(256, 1024, 216, jnp.bfloat16) is None  # columns off the tile
  assert sk.pick_splits(100, 1024, 1024, jnp.bfloat16) is None  # rows off the tile
  assert sk.pick_splits(256, 192, 1024, jnp.bfloat16) == 1      # K = 3 steps: S=1 only
  assert sk.pick_splits(256, 2048, 1024, jnp.bfloat16, max_splits=2) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("M", [256, 128, 64])
def test_on_the_gpu_matches_float64_and_repeats(rng, M):
  """1, 2 and pick_splits' split of MoHGE-3B's decode projections on the H200 against
  float64, and the same bits in a second run (the cluster sums in a fixed order)."""
  for K, N, picked in SHAPES_3B:
    x, w = _operands(rng, M, K, N)
    for splits in sorted({1, 2, picked}):
      if sk.unsupported_reason(M, K, N, x.dtype, splits=splits):
        continue
      y = sk.splitk_matmul(x, w, splits=splits)
      _check(y, x, w)
      np.testing.assert_array_equal(
          np.asarray(sk.splitk_matmul(x, w, splits=splits)), np.asarray(y))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_mla_decode_through_the_kernel_matches_xla(rng):
  """MLA.decode with prepared bf16 weights at batch 256 through the kernel
  (model.decode_gemm=splitk) against the same step with XLA's products: the output and
  the cache entries within bf16 rounding."""
  from mohge_jax.attention import MLA, MLACache
  from mohge_jax.config import load_config
  outs = {}
  for gemm in ("xla", "splitk"):
    m = load_config(str(ROOT / "configs/mohge_3b.yaml"), [f"model.decode_gemm={gemm}"]).model
    attn = MLA(m, rngs=nnx.Rngs(0))
    prepared = attn.decode_weights()
    B, S = 256, 128
    r = np.random.default_rng(1)
    cache = MLACache(jnp.asarray(r.standard_normal((B, S, m.kv_lora_rank)), jnp.bfloat16),
                     jnp.asarray(r.standard_normal((B, S, m.qk_rope_head_dim)), jnp.bfloat16))
    x = jnp.asarray(r.standard_normal((B, 1, m.d_model)), jnp.bfloat16)
    pos = jnp.asarray(r.integers(0, S, B), jnp.int32)
    step = nnx.jit(lambda attn, x, p, c, w: attn.decode(x, p, c, prepared=w))
    outs[gemm] = jax.tree.map(np.asarray, step(attn, x, pos, cache, prepared))
  (y_x, c_x), (y_k, c_k) = outs["xla"], outs["splitk"]
  scale = np.abs(y_x.astype(np.float32)).max()
  np.testing.assert_allclose(y_k.astype(np.float32), y_x.astype(np.float32),
                             atol=0.02 * scale, rtol=0.02)
  for a, b in zip(jax.tree.leaves(c_k), jax.tree.leaves(c_x)):
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=0.05, rtol=0.02)
