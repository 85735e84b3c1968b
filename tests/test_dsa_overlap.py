"""benchmarks/dsa_overlap.py: the union ratios it reports, against their bounds and a
direct count; a model's selections layer by layer (its --workdir mode)."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import dsa as bench
from benchmarks import dsa_overlap
from mohge_jax import sparse_attention as dsa
from mohge_jax.config import load_config
from mohge_jax.model import Transformer


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


def test_layer_selections_follow_the_model_layer_by_layer(rng):
  """`layer_selections` on a DSA model (two layers, a dense first): layer 0's selection
  equals select_topk over its indexer on the embedded tokens' normed states; the layers it
  runs one by one end in the model's own hidden states (its forward pass's return_hidden,
  once normed); other indexers select other keys; union ratios lie in [1, n] and one
  group's equals a direct count."""
  cfg = load_config("configs/tiny.yaml", [
      "model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
      "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
      "model.dense_ffn_width=48", "model.group_widths=[8,16]", "model.experts_per_group=2",
      "model.top_k_groups=1", "model.top_k=2", "model.shared_expert_width=8",
      "model.num_layers=2", "model.max_seq_len=64", "model.init_std=0.1",
      "model.sparse_attention=dsa", "model.dsa_topk=6", "model.dsa_index_heads=2",
      "model.dsa_index_dim=8", "model.dsa_index_rope_dim=4", "model.dsa_query_chunk=8",
      "train.dsa_stage=sparse", "train.seq_len=64"])
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  B, T = 2, 40
  tokens = jnp.asarray(rng.integers(1, 257, size=(B, T)))
  sel, x = dsa_overlap.layer_selections(model, tokens)
  assert len(sel) == 2 and all(i.shape == (B, T, 6) for i, _ in sel)
  want, _ = nnx.jit(lambda model: model(tokens, return_hidden=True))(model)
  np.testing.assert_allclose(np.asarray(model.final_norm(x)), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
  # layer 0 by hand
  stack = model.stacks[0].layers
  first = nnx.merge(nnx.graphdef(stack), jax.tree.map(lambda a: a[0], nnx.state(stack)))
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  h = first.attn_norm(jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype))
  idx, valid = jax.jit(lambda q, w, k: dsa.select_topk(
      q, w, k, topk=6, chunk=8, method=cfg.model.dsa_topk_method)[:2])(
          *first.attn.indexer(h, first.attn.query_latent(h), pos))
  np.testing.assert_array_equal(sel[0][0], np.asarray(idx))
  np.testing.assert_array_equal(sel[0][1], np.asarray(valid))
  seed = int(rng.integers(1 << 30))
  other = [dsa.Indexer(cfg.model, rngs=nnx.Rngs(seed + i)) for i in range(2)]
  sel_other, _ = dsa_overlap.layer_selections(model, tokens, other)
  assert any((a[0] != b[0]).any() for a, b in zip(sel, sel_other))
  idx1, valid1 = sel[1][0][0], sel[1][1][0]
  for n in dsa_overlap.NS[:3]:
    r = dsa_overlap.union_ratios(idx1, valid1, range(6, T - n), n)
    assert ((r >= 1.0) & (r <= n)).all()
  want = len(set(idx1[10][valid1[10]]) | set(idx1[11][valid1[11]])) / np.mean(
      [valid1[10].sum(), valid1[11].sum()])
  assert dsa_overlap.union_ratios(idx1, valid1, [10], 2)[0] == want
