"""Decoder: causality, jit == eager, loss terms, RoPE/YaRN, parameter counts."""

import math

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mohge_jax import params
from mohge_jax.config import load_config
from mohge_jax.model import Transformer

TINY = ["model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
        "model.dense_ffn_width=48", "model.group_widths=[8,16,24]", "model.experts_per_group=2",
        "model.top_k_groups=2", "model.top_k=3", "model.shared_expert_width=8",
        "model.num_layers=3", "model.max_seq_len=64", "model.init_std=0.1", "train.seq_len=32"]


@pytest.mark.parametrize("extra", [
    [],  # MLA + MoHGE
    ["model.attention=mha", "model.head_dim=8", "model.num_kv_heads=1", "model.ffn=moe",
     "model.group_widths=[16]", "model.experts_per_group=4", "model.top_k_groups=1"],
    ["model.q_lora_rank=12", "model.rope_scaling=yarn", "model.yarn_original_max_len=16",
     "model.remat=full"],
])
def test_causal(rng, extra):
  cfg = load_config("configs/tiny.yaml", TINY + extra)
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  B, L, t = 2, 24, int(rng.integers(1, 22))
  tokens = rng.integers(0, 257, size=(B, L))
  changed = tokens.copy()
  changed[:, t + 1:] = rng.integers(0, 257, size=(B, L - t - 1))
  a, _ = model(jnp.asarray(tokens))
  b, _ = model(jnp.asarray(changed))
  np.testing.assert_allclose(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]), atol=1e-5)
  assert not np.allclose(np.asarray(a[:, t + 1:]), np.asarray(b[:, t + 1:]))


def test_jit_and_eager_agree_and_loss_terms(rng):
  cfg = load_config("configs/tiny.yaml", TINY)
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  tokens = jnp.asarray(rng.integers(0, 257, size=(2, 16)))
  eager = model(tokens)
  jitted = nnx.jit(lambda m, t: m(t))(model, tokens)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-5)
  logits, aux = eager
  assert logits.dtype == jnp.float32 and logits.shape == (2, 16, cfg.model.padded_vocab)
  assert set(aux) == {"group_aux", "expert_aux", "z_loss", "dsa_kl", "group_tokens",
                      "expert_tokens"}
  assert aux["group_tokens"].shape == (2, 3)  # two routed layers, three groups
  assert float(aux["group_aux"]) > 0 and float(aux["expert_aux"]) > 0


def test_bf16_compute_keeps_float32_params_and_logits(rng):
  cfg = load_config("configs/tiny.yaml", TINY + ["model.dtype=bfloat16"])
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in leaves)
  logits, _ = model(jnp.asarray(rng.integers(0, 257, size=(2, 8))))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_doc_attention_mask_isolates_documents(rng):
  cfg = load_config("configs/tiny.yaml", TINY + ["model.doc_attention_mask=true"])
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  tokens = rng.integers(0, 257, size=(1, 20))
  seg = np.array([[0] * 8 + [1] * 12])
  pos = np.array([list(range(8)) + list(range(12))])
  other = tokens.copy()
  other[:, :8] = rng.integers(0, 257, size=(1, 8))  # change document 0 only
  a, _ = model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
  b, _ = model(jnp.asarray(other), jnp.asarray(pos), jnp.asarray(seg))
  np.testing.assert_allclose(np.asarray(a[:, 8:]), np.asarray(b[:, 8:]), atol=1e-5)
  # The second document alone, from position 0, gives the same logits.
  c, _ = model(jnp.asarray(tokens[:, 8:]))
  np.testing.assert_allclose(np.asarray(a[:, 8:]), np.asarray(c), atol=1e-4)


def test_param_counts_match_formulas():
  cfg = load_config("configs/mohge_3b.yaml")
  c = params.count(cfg)
  m = cfg.model
  d = m.d_model
  b = c["breakdown"]
  assert m.padded_vocab == 130688
  assert b["embedding"] == b["head"] == 130688 * d
  assert b["routed_experts"] == 14 * 8 * sum(m.group_widths) * 3 * d
  assert b["shared_experts"] == 14 * 3 * d * 2048
  assert b["dense_ffn"] == 3 * d * 6144
  assert b["router"] == 14 * d * (8 + 64)
  mla = d * 16 * 192 + d * (512 + 64) + 512 + 512 * 16 * 256 + 16 * 128 * d
  assert b["attention"] == 15 * mla
  assert c["total"] == sum(b.values())
  assert 2.7e9 < c["total"] < 2.9e9
  moe = params.count(load_config("configs/moe_3b.yaml"))
  assert 0.8 < c["total"] / moe["total"] < 0.86  # the paper's "about 20% fewer" (16% here)
  # Routed experts at the mean width (832 vs 1024), plus the group router.
  assert c["activated"] - moe["activated"] == 14 * 6 * 3 * d * (832 - 1024) + 14 * d * 8


@pytest.mark.parametrize("name", ["tiny", "mohge_3b", "moe_3b", "mohge_small", "moe_small",
                                  "dense_small"])
def test_shipped_configs_load(name):
  c = params.count(load_config(f"configs/{name}.yaml"))
  if name.endswith("small"):
    assert 100e6 <= c["total"] <= 300e6
  if name == "mohge_small":
    moe = params.count(load_config("configs/moe_small.yaml"))["total"]
    assert 0.75 < c["total"] / moe < 0.85


@pytest.mark.parametrize("scaled", [True, False])
def test_output_projections_get_megatrons_scaled_init(rng, scaled):
  """w_o and every w_down (dense, shared, routed experts) start at init_std/sqrt(2L), the
  other matrices at init_std: sample stds of the initialised parameters."""
  L, std = 8, 0.1
  cfg = load_config("configs/tiny.yaml", TINY + [f"model.num_layers={L}",
                                                 f"model.init_std={std}",
                                                 f"model.scaled_output_init={str(scaled).lower()}"])
  out_std = std / math.sqrt(2 * L) if scaled else std
  assert cfg.model.output_init_std == pytest.approx(out_std)
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  pooled, names = {True: [], False: []}, []
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # norm scales start at 1
      continue
    is_output = "w_o" in name or "w_down" in name
    x = np.asarray(leaf, np.float64).ravel()
    np.testing.assert_allclose(x.std(), out_std if is_output else std, rtol=0.3, err_msg=name)
    pooled[is_output].append(x)
    names.append(name)
  for part in ("attn", "shared", "w_down"):  # attention, shared and dense/routed experts
    assert any(part in n and ("w_o" in n or "w_down" in n) for n in names), part
  np.testing.assert_allclose(np.concatenate(pooled[True]).std(), out_std, rtol=0.05)
  np.testing.assert_allclose(np.concatenate(pooled[False]).std(), std, rtol=0.05)


def test_paper_config_output_init_std():
  for name in ("mohge_3b", "moe_3b"):
    m = load_config(f"configs/{name}.yaml").model
    assert m.scaled_output_init
    assert m.output_init_std == pytest.approx(0.008 / math.sqrt(30))  # ~0.00146


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_and_unrolled_layers_agree(rng, remat):
  """model.scan_layers runs the same stacked parameters as a Python loop over layers:
  same logits, aux terms and gradients. Two routed layers: a stack the scan runs more than
  once (three cost the unrolled program a third more compilation, checking nothing more)."""
  cfg = load_config("configs/tiny.yaml", TINY + [f"model.remat={remat}"])
  model = Transformer(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, state = nnx.split(model)
  unrolled_cfg = load_config("configs/tiny.yaml", TINY + [f"model.remat={remat}",
                                                           "model.scan_layers=false"])
  unrolled_def, _ = nnx.split(nnx.eval_shape(lambda: Transformer(unrolled_cfg, rngs=nnx.Rngs(0))))
  tokens = jnp.asarray(rng.integers(0, 257, size=(2, 16)))
  w = jnp.asarray(rng.normal(size=(2, 16, cfg.model.padded_vocab)), jnp.float32)

  def loss(params, gdef):
    logits, aux = nnx.merge(gdef, params)(tokens)
    return jnp.sum(logits * w) + 100 * aux["expert_aux"] + 1e3 * aux["group_aux"], aux

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)  # (op by op: 60 s)
  (l_scan, aux_scan), g_scan = grad(state, graphdef)
  (l_loop, aux_loop), g_loop = grad(state, unrolled_def)
  np.testing.assert_allclose(float(l_scan), float(l_loop), rtol=1e-5)
  chex.assert_trees_all_close(aux_scan, aux_loop, rtol=1e-5, atol=1e-7)
  assert aux_scan["group_tokens"].shape == (2, 3)  # two routed layers, three groups
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)):  # float32 sums
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b).max()))
  # The gradient reaches every layer of the stack.
  g_routed = g_scan["stacks"][1]["layers"]["ffn"]["expert_router"][...]
  assert all(float(jnp.abs(g_routed[i]).max()) > 0 for i in range(2))


def _count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive `name`, sub-jaxprs (jit, scan, remat bodies) counted at every
  place they are called."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count_primitive(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count_primitive(sub, name)
  return n


def test_scan_traces_one_layer_whatever_the_depth():
  """With scan_layers the program holds one copy of the routed layer: the number of sorts
  (dispatch) in the jaxpr does not grow with depth; unrolled, it does."""
  def sorts(layers, scan):
    cfg = load_config("configs/tiny.yaml", TINY + [f"model.num_layers={layers}",
                                                   f"model.scan_layers={scan}"])
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    jaxpr = jax.make_jaxpr(lambda p, t: nnx.merge(graphdef, p)(t))(
        params, jnp.zeros((1, 8), jnp.int32))
    return _count_primitive(jaxpr.jaxpr, "sort")
  assert sorts(2, True) == sorts(6, True) > 0
  assert sorts(6, False) == 5 * sorts(2, False)
