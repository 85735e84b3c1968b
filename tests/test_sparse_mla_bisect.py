"""benchmarks/dsa_kernel_bisect.py on CPU: every debug mode of the sparse MLA kernel
(copy_q, gather, scores, probs, full) in the GPU interpreter equals the float32 reference
(one variant a part; gather also split "cta" with one tile per copy). (Every mode x
variant lowering for CUDA: `python -m benchmarks.dsa_kernel_bisect --lower-only`, ~25 s;
the default kernel's lowering is tested in test_sparse_attention.py.)"""
from benchmarks import dsa_kernel_bisect as bisect


def test_bisect_modes_interpreted_equal_reference():
  results = bisect.main(["--interpret", "--small", "--quick"])
  assert results and all(results.values()), results
  assert {k.split(" / ")[0] for k in results} >= {
      "copy_q", "gather", "scores", "probs", "full, many queries, 3 steps"}

