"""benchmarks/tma_stream.py: the streaming kernel in the Pallas GPU interpreter walks
every box of its rows (each CTA's output is the last box it read), a CTA a row and
persistent; its CUDA lowering; the variants' names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import tma_stream as ts


@pytest.mark.parametrize("persistent,ring", [(False, 4), (True, 5), (True, 1)])
def test_stream_reads_each_ctas_rows_to_the_last_box(monkeypatch, rng, persistent, ring):
  monkeypatch.setattr(ts, "SMS", 2)  # 5 rows over 2 persistent CTAs: rows 0,2,4 and 1,3
  x = jnp.asarray(rng.normal(size=(5, 192, 128)), jnp.bfloat16)
  out = np.asarray(ts.stream(x, box_rows=64, box_cols=64, ring=ring, persistent=persistent,
                             swizzle=True, interpret=True), np.float32)
  xs = np.asarray(x, np.float32)
  assert out.shape == ((2 if persistent else 5), 64, 64)
  for i, o in enumerate(out):
    last_row = list(range(i, 5, 2))[-1] if persistent else i
    np.testing.assert_array_equal(o, xs[last_row, 128:, 64:])


def test_variants_lower_for_cuda_and_bad_names_are_refused():
  x = jax.ShapeDtypeStruct((256, 576, 512), jnp.bfloat16)
  for name in ("row64x18", "persist64x18", "flat64x4", "persist192x8"):
    text = jax.jit(ts.variant(name)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text, name
  with pytest.raises(ValueError, match="unknown variant"):
    ts.variant("row64")
  with pytest.raises(ValueError, match="must tile"):
    jax.jit(ts.variant("row128x9")).trace(x)
