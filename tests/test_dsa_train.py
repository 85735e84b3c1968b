"""DSA's two training stages end to end, in process: a dense model's checkpoint starts a
dense warm-up run (train.init_from, indexer fresh) that trains only the indexer, whose
checkpoint starts a sparse run that trains everything; a stage change is not resumed."""

import jax
import numpy as np
import pytest

from mohge_jax.checkpoint import Checkpointer
from mohge_jax.config import load_config
from mohge_jax.trainer import TrainingError, abstract_state, make_init_fn, train

MICRO = ["model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
         "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
         "model.dense_ffn_width=48", "model.group_widths=[8,16]", "model.experts_per_group=2",
         "model.top_k_groups=1", "model.top_k=2", "model.shared_expert_width=8",
         "model.num_layers=1", "model.first_dense_layers=0", "train.batch_size=8",
         "train.seq_len=32", "train.steps=2",
         "train.warmup_steps=0", "train.log_every=1", "train.eval_batches=0",
         "train.compile_cache=", "train.lr=1e-2"]
# One routed layer (no dense first layer): the warm-up's freezing goes by parameter path, not
# by layer kind, and this layer has attention, indexer, router, shared and routed experts.
DSA = ["model.sparse_attention=dsa", "model.dsa_index_heads=2", "model.dsa_index_dim=8",
       "model.dsa_index_rope_dim=4", "model.dsa_topk=8", "model.dsa_query_chunk=16"]


def _params(cfg, workdir):
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  state, _ = ckpt.restore(None, abstract_state(cfg))
  ckpt.close()
  key = jax.tree_util.keystr
  return {key(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(state["params"])}


def test_dense_then_warmup_then_sparse(tmp_path):
  cache = [f"data.cache_dir={tmp_path / 'cache'}"]
  dense_cfg = load_config("configs/tiny.yaml", MICRO + cache)
  train(dense_cfg, tmp_path / "dense", log=lambda *_: None)
  dense = _params(dense_cfg, tmp_path / "dense")

  warm_cfg = load_config("configs/tiny.yaml", MICRO + cache + DSA + [
      "train.dsa_stage=dense_warmup", f"train.init_from={tmp_path / 'dense'}"])
  train(warm_cfg, tmp_path / "warm", log=lambda *_: None)
  warm = _params(warm_cfg, tmp_path / "warm")
  fresh = jax.tree_util.tree_leaves_with_path(make_init_fn(warm_cfg)()["params"])
  fresh = {jax.tree_util.keystr(p): np.asarray(a) for p, a in fresh}
  indexer = [k for k in warm if "indexer" in k]
  assert indexer and set(warm) - set(indexer) == set(dense)
  for k in dense:  # frozen: exactly the dense run's values
    np.testing.assert_array_equal(warm[k], dense[k], err_msg=k)
  assert any(not np.array_equal(warm[k], fresh[k]) for k in indexer)  # the indexer trained

  sparse_cfg = load_config("configs/tiny.yaml", MICRO + cache + DSA + [
      "train.dsa_stage=sparse", f"train.init_from={tmp_path / 'warm'}"])
  result = train(sparse_cfg, tmp_path / "sparse", log=lambda *_: None)
  assert np.isfinite(result.loss)
  sparse = _params(sparse_cfg, tmp_path / "sparse")
  assert all(not np.array_equal(sparse[k], warm[k]) for k in sparse if k.endswith("w_o']"))
  assert any(not np.array_equal(sparse[k], warm[k]) for k in indexer)

  # Resuming the sparse run's workdir as a warm-up run would need another optimizer state.
  with pytest.raises(TrainingError, match="init_from"):
    train(load_config("configs/tiny.yaml", MICRO + cache + DSA + [
        "train.dsa_stage=dense_warmup", "train.steps=3"]), tmp_path / "sparse",
        log=lambda *_: None)
