"""pallas_kernels/head_gpu.py, greedy decoding's output layer with the argmax in its epilogue:
the Pallas GPU interpreter against the float32 reference on CPU, ties and the padded
vocabulary included; CUDA lowering at MoHGE-3B's shapes; the H200 (-m gpu)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import head_gpu as hg


def _exact_inputs(rng, B, D, V, vocab):
  """x on a 2^-4 grid and w on 2^-6 (bf16-exact, every product and partial sum exact in
  float32: any summation order gives the same logits, ties included). The padded columns
  (>= vocab) hold the largest logits, so an unmasked kernel would pick them; ties are
  planted: a column copied to a later one in its tile and to one in a later tile."""
  x = np.round(rng.normal(size=(B, D)) * 16) / 16
  w = np.round(rng.normal(size=(D, V)) * 64 / np.sqrt(D)) / 64
  best = np.argmax(x @ w[:, :vocab], axis=1)
  w[:, vocab:] = 2 * w[:, best[:1]]   # twice row 0's best logit (> 0): unmasked, it wins
  assert np.argmax(x[0] @ w) >= vocab
  for j in set(best[:4].tolist()):
    for k in (j + 1, j + 137):   # (the next column, and one in a later tile of 128)
      if k < vocab:
        w[:, k] = w[:, j]
  return jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)


@pytest.mark.parametrize("B,tile_n,steps", [(200, 128, 4), (5, 64, 2)])
def test_interpreted_kernel_equals_the_reference(rng, B, tile_n, steps):
  D, V, vocab = 128, 512, 500
  x, w = _exact_inputs(rng, B, D, V, vocab)
  got_tok, got_best = hg.greedy_head(x, w, vocab, tile_n=tile_n, steps=steps, num_ctas=3,
                                     interpret=True)
  want_tok, want_best = hg.reference(x, w, vocab)
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)[:, :vocab]
  np.testing.assert_array_equal(np.asarray(want_tok), np.argmax(logits, axis=1))  # float64
  np.testing.assert_array_equal(np.asarray(got_tok), np.asarray(want_tok))
  np.testing.assert_array_equal(np.asarray(got_best), np.asarray(want_best))
  assert got_tok.dtype == jnp.int32 and got_tok.shape == (B,)


def test_bad_inputs_are_refused_by_name(rng):
  x = jnp.zeros((4, 128), jnp.bfloat16)
  w = jnp.zeros((128, 512), jnp.bfloat16)
  with pytest.raises(ValueError, match="vocab_size=600"):
    hg.greedy_head(x, w, 600)
  with pytest.raises(ValueError, match="do not multiply"):
    hg.greedy_head(x, w[:64], 500)
  with pytest.raises(ValueError, match="bf16 or f16"):
    hg.greedy_head(x.astype(jnp.float32), w.astype(jnp.float32), 500)
  with pytest.raises(ValueError, match="batch 300"):
    hg.greedy_head(jnp.zeros((300, 128), jnp.bfloat16), w, 500)
  with pytest.raises(ValueError, match="multiple of tile_n"):
    hg.greedy_head(x, w[:, :500], 500)


def test_lowers_for_cuda_at_mohge_3b_shapes():
  x = jax.ShapeDtypeStruct((256, 1024), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1024, 130688), jnp.bfloat16)
  text = jax.jit(lambda x, w: hg.greedy_head(x, w, 130656)).trace(x, w).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "greedy_head_kernel" in text and "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.skipif(pk.resolve_backend("auto") != "mosaic_gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("B", [256, 32, 1])
def test_kernel_on_the_gpu_equals_the_reference(rng, B):
  """MoHGE-3B's width and vocabulary on the H200, exact inputs: the same tokens and values."""
  x, w = _exact_inputs(rng, B, 1024, 130688, 130656)
  got_tok, got_best = hg.greedy_head(x, w, 130656)
  want_tok, want_best = hg.reference(x, w, 130656)
  np.testing.assert_array_equal(np.asarray(got_tok), np.asarray(want_tok))
  np.testing.assert_array_equal(np.asarray(got_best), np.asarray(want_best))


def test_benchmark_writes_checked_rows(tmp_path):
  """benchmarks/head.py at small shapes with the kernel interpreted: a row for XLA and for
  each tile, the kernel's tokens checked against XLA's in the same run."""
  import json
  from benchmarks import head
  out = tmp_path / "head.json"
  head.main(["--batches", "5", "--d-model", "128", "--vocab", "500", "--vocab-padded", "512",
             "--tiles", "128x2,64x2", "--reps", "1", "--interpret", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [r["head"] for r in rows] == ["xla", "kernel[128x2]", "kernel[64x2]"]
  for r in rows[1:]:
    assert r["token_agreement"] >= 0.8 and r["us"] > 0 and r["ratio_to_xla"] > 0
