"""benchmarks/dsa_overlap.py: the union ratios it reports, against their bounds and a
direct count."""
import json
import sys

import numpy as np

from benchmarks import dsa as bench
from benchmarks import dsa_overlap
from mohge_jax import sparse_attention as dsa


def test_overlap_table_matches_a_direct_count(tmp_path, monkeypatch):
  """Top-32 of up to 640 keys: every union ratio lies in [1, n] and 16 queries' union is
  well above one set's; the most chosen key's count equals numpy's count of the same
  selection."""
  seq, topk, out = 640, 32, tmp_path / "o.json"
  monkeypatch.setattr(sys, "argv", ["dsa_overlap", "--seq", str(seq), "--topk", str(topk),
                                    "--groups", "8", "--out", str(out)])
  dsa_overlap.main()
  got = json.loads(out.read_text())
  assert [r["n"] for r in got["rows"]] == [2, 4, 8, 16]
  for r in got["rows"]:
    assert 1.0 <= r["union_over_one_median"] <= r["n"]
    assert 1.0 <= r["union_over_one_mean"] <= r["n"]
  assert got["rows"][-1]["union_over_one_mean"] > 2
  x = bench.inputs(seq)
  idx, valid = (np.asarray(a[0]) for a in dsa.select_topk(
      x["q_I"], x["w_I"], x["k_I"], topk=topk, chunk=topk)[:2])
  assert got["queries_choosing_a_key"]["1.0"] == np.bincount(idx[valid].ravel()).max()
