"""benchmarks/reduce_probe.py: the add kernel in the Pallas GPU interpreter adds each row
index's ones into dst (against a numpy count), for every pattern and with rotated steps;
the check refuses a wrong dst; the kernel's CUDA lowering uses TMA reduce-adds; bad input
is refused."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import reduce_probe as rp


def _selection(rng, T: int, K: int):
  """A causal selection as the DSA benchmark's: query t chooses min(t + 1, K) distinct
  positions <= t in random order, the rest invalid (last)."""
  idx = np.zeros((T, K), np.int32)
  valid = np.zeros((T, K), bool)
  for t in range(T):
    n = min(t + 1, K)
    idx[t, :n] = rng.choice(t + 1, n, replace=False)
    valid[t, :n] = True
  return jnp.asarray(idx), jnp.asarray(valid)


@pytest.mark.parametrize("pattern", rp.PATTERNS)
def test_adds_equal_the_row_counts(rng, pattern):
  T, K = 6, 64   # two 32-row steps a CTA
  idx, valid = _selection(rng, T, K)
  rows, rotate = rp.pattern_rows(pattern, idx, valid, seed=int(rng.integers(1 << 30)))
  assert rotate == (pattern == "dsa_rot")
  rows_np = np.asarray(rows)
  if pattern.startswith("dsa"):   # the same keys as the selection, in some order
    np.testing.assert_array_equal(np.sort(rows_np, -1),
                                  np.sort(np.where(valid, idx, -1), -1))
  dst = np.array(rp.add_rows(rows, T, rotate=rotate, interpret=True))
  want = np.bincount(rows_np[rows_np >= 0], minlength=T).astype(np.float32)
  assert dst.shape == (T, rp.COLS)
  np.testing.assert_array_equal(dst, np.broadcast_to(want[:, None], dst.shape))
  assert rp.check(jnp.asarray(dst), rows)
  dst[rng.integers(T), rng.integers(rp.COLS)] += 1.0
  assert not rp.check(jnp.asarray(dst), rows)


def test_lowers_for_cuda_with_tma_reduce_adds_and_refuses_bad_input():
  rows = jax.ShapeDtypeStruct((16384, 2048), jnp.int32)
  text = jax.jit(lambda r: rp.add_rows(r, 16384, rotate=True)).trace(rows).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "cp.reduce.async.bulk" in text
  with pytest.raises(ValueError, match="multiple of 32"):
    rp.add_rows(jnp.zeros((4, 48), jnp.int32), 4)
  with pytest.raises(ValueError, match="unknown pattern"):
    rp.pattern_rows("sorted", jnp.zeros((4, 32), jnp.int32), jnp.ones((4, 32), bool))


def test_main_writes_checked_rows(monkeypatch, tmp_path):
  """The command line end to end at a toy length (the kernel in the interpreter; two
  patterns, the rest are the test above's): a row a pattern, correct, with the adds the
  benchmark's causal selection makes."""
  real = rp.add_rows
  monkeypatch.setattr(rp, "add_rows", lambda *a, **k: real(*a, **k, interpret=True))
  out = tmp_path / "probe.json"
  assert rp.main(["--seqs", "32", "--patterns", "dsa_rot,distinct", "--reps", "1",
                  "--out", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(r["pattern"], r["correct"]) for r in rows] == [("dsa_rot", True),
                                                           ("distinct", True)], rows
  assert [r["adds"] for r in rows] == [32 * 33 // 2, 32 * 32]  # causal: every key <= t
