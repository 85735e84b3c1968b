"""benchmarks/dsa_kernel_bisect.py on CPU: every debug mode of the sparse MLA kernel
(copy_q, gather, scores, probs, full) in the GPU interpreter equals the float32 reference
(one variant a part; gather also split "cta" with one tile per copy), and every mode x
variant lowers for CUDA at MoHGE-3B head shapes."""
from benchmarks import dsa_kernel_bisect as bisect


def test_bisect_modes_interpreted_equal_reference():
  results = bisect.main(["--interpret", "--small", "--quick"])
  assert results and all(results.values()), results
  assert {k.split(" / ")[0] for k in results} >= {
      "copy_q", "gather", "scores", "probs", "full, many queries, 3 steps"}


def test_bisect_modes_lower_for_cuda():
  assert bisect.main(["--lower-only"]) == {"lower": True}
