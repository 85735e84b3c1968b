"""benchmarks/decode.py on CPU at tiny sizes: its timed loop decodes what `generate` decodes
(greedy), and its bytes per step equal a count over the real arrays (the bf16 parameter
tree's leaves, the experts each step's routes hit, the prefilled cache's entries); and
benchmarks/decode_experts.py's rows in the Pallas interpreter."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import decode
from mohge_jax import dispatch
from mohge_jax import generate as gen
from mohge_jax.config import load_config
from mohge_jax.model import layer_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dtype=bfloat16", "model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
        "model.dense_ffn_width=48", "model.group_widths=[8,16,24]", "model.experts_per_group=2",
        "model.top_k_groups=2", "model.top_k=3", "model.shared_expert_width=8",
        "model.max_seq_len=32", "train.seq_len=32"]


def counted_bytes(cfg, state, caches, positions_B, expert_ids_RxBxK):
  """Bytes a step reads, counted on the arrays: every leaf but the embedding and the routed
  experts whole, one embedding row per batch row, the slices [layer, n] of the stacked
  expert weights that the step's routes hit, and per row the cache entries of positions
  0..position."""
  N = cfg.model.experts_per_group
  runs = layer_runs(cfg.model.ffn_kinds)
  total = 0
  for path, leaf in nnx.to_flat_state(state):
    a = leaf.get_value()
    keys = [str(k) for k in path]
    if keys[0] == "embed":
      total += len(positions_B) * a[0].nbytes
    elif keys[-2:-1] in (["w_gate_up"], ["w_down"]):
      stack, g = path[1], path[-1]  # stacks/<stack>/layers/ffn/<w>/<group>: [layers, N, ...]
      first = sum(n for kind, n in runs[:stack] if kind != "dense")
      for layer in range(a.shape[0]):
        hit = set(np.unique(expert_ids_RxBxK[first + layer]).tolist())
        total += sum(a[layer, n].nbytes for n in range(N) if g * N + n in hit)
    else:
      total += a.nbytes
  per_row_position = sum(a.dtype.itemsize * np.prod(a.shape) / np.prod(a.shape[1:3])
                         for c in caches for a in jax.tree.leaves(c))
  return total + per_row_position * float(np.sum(positions_B + 1))


def test_decode_benchmark_bytes_and_tokens():
  cfg = load_config(str(ROOT / "configs/tiny.yaml"), TINY)
  graphdef, state = decode.init_bf16(cfg)
  assert {a.dtype for a in jax.tree.leaves(state)} == {jnp.dtype(jnp.bfloat16)}
  model = nnx.merge(graphdef, state)
  P, N = 6, 3
  for B in (1, 4):
    rows = list(decode.run(cfg, graphdef, state, B, prompt_len=P, new_tokens=N, reps=1,
                           backends=(None, "all_experts"),
                           layouts=("scan", "unrolled") if B > 1 else ("scan",)))
    (row, arrays), (row_all, _) = rows[:2]
    assert (row["expert_backend"], row_all["expert_backend"]) == ("tiled", "all_experts")
    if B > 1:  # the unrolled layers over separate buffers: the same tokens by the same routes
      (row_u, arrays_u), _ = rows[2:]
      assert (row["layout"], row_u["layout"], row_u["expert_backend"]) == (
          "scan", "unrolled", "tiled")
      np.testing.assert_array_equal(arrays_u["tokens_BxN"], arrays["tokens_BxN"])
      np.testing.assert_array_equal(arrays_u["expert_ids_NxRxBxK"],
                                    arrays["expert_ids_NxRxBxK"])
      assert row_u["bytes_per_step"] == row["bytes_per_step"] and row_u["step_ms"] > 0
    prompts_BxP, ids_NxRxBxK = arrays["prompts_BxP"], arrays["expert_ids_NxRxBxK"]
    assert ids_NxRxBxK.shape == (N, 2, B, cfg.model.top_k)

    if B > 1:  # the timed loop is generation: greedy generate gives the same N + 1 tokens
      out = gen.generate(model, prompts_BxP, np.full(B, P), jax.random.key(0),
                         max_new_tokens=N + 1, temperature=0.0, return_mask=False)
      np.testing.assert_array_equal(arrays["tokens_BxN"], np.asarray(out.tokens))

    _, caches, _ = jax.eval_shape(lambda p: gen.prefill(model, p, jnp.full((B,), P), P + N),
                                  prompts_BxP)  # the cache's shapes and dtypes
    want = np.mean([counted_bytes(cfg, state, caches, np.full(B, P + t), ids_NxRxBxK[t])
                    for t in range(N)])
    np.testing.assert_allclose(row["bytes_per_step"], want, rtol=1e-12)
    assert row["experts_hit_per_layer"] <= min(B * cfg.model.top_k, cfg.model.num_experts)
    np.testing.assert_allclose(row["limit_ms"], want / 4.8e12 * 1e3, rtol=1e-12)
    np.testing.assert_allclose(row["fraction_of_bandwidth"], row["limit_ms"] / row["step_ms"])
    np.testing.assert_allclose(row["tokens_per_s"], B / row["step_ms"] * 1e3)
    assert row["step_ms"] > 0 and row["compile_s"] > 0 and row["prefill_ms"] > 0
    assert row_all["step_ms"] > 0 and row_all["prefill_ms"] == row["prefill_ms"]
    assert row["first_decoded_token_agreement"] == 1.0
    assert 0 <= row_all["first_decoded_token_agreement"] <= 1

  # --decode-options: a row per option, the same tokens (here on the CPU both compile
  # without options: generate's are a GPU's)
  rows = list(decode.run(cfg, graphdef, state, 2, prompt_len=P, new_tokens=N, reps=1,
                         decode_options=("generate", "xla")))
  assert [r["decode_options"] for r, _ in rows] == ["generate", "xla"]
  assert [r["compiler_options"] for r, _ in rows] == [gen.decode_compiler_options(), {}]
  np.testing.assert_array_equal(rows[0][1]["tokens_BxN"], rows[1][1]["tokens_BxN"])


def test_decode_benchmark_profile_rows(tmp_path):
  """--profile: the row keeps the decode step's top operations by kernel name, by name
  stack and by distinct kernel (`profile_summary`'s by="kernel"), per decode step."""
  cfg = load_config(str(ROOT / "configs/tiny.yaml"), TINY)
  graphdef, state = decode.init_bf16(cfg)
  (row, _), = decode.run(cfg, graphdef, state, 2, prompt_len=6, new_tokens=3, reps=1,
                         layouts=("unrolled",), profile=str(tmp_path), profile_top=5)
  top = row["profile_top_ops"]
  assert {r["by"] for r in top} == {"name", "source", "kernel"}
  for by in ("name", "source", "kernel"):
    rows = [r for r in top if r["by"] == by]
    assert 0 < len(rows) <= 5 and all(r["ms_per_token_step"] > 0 for r in rows)


def test_expected_experts_under_uniform_routing():
  """The dry run's expected distinct experts, E * (1 - (1 - K/E)^B), against sampling MoE
  routes (K distinct of E uniformly per token)."""
  cfg = load_config(str(ROOT / "configs/moe_3b.yaml"))
  rng = np.random.default_rng(0)
  E, K = cfg.model.num_experts, cfg.model.top_k
  for B in (1, 32, 256):
    ids = np.stack([[rng.choice(E, K, replace=False) for _ in range(B)] for _ in range(200)])
    sampled = np.mean([len(np.unique(i)) for i in ids])
    got = decode.step_bytes(cfg, np.zeros(B, int), None)["experts"]
    per_layer = got / decode.routed_layers(cfg) / decode.expert_bytes_E(cfg)[0]
    np.testing.assert_allclose(per_layer, sampled, rtol=0.02)


@pytest.mark.parametrize("config", ["configs/mohge_3b.yaml", "configs/moe_3b.yaml"])
def test_3b_prefill_and_decode_lower_for_gpu(monkeypatch, config):
  """The benchmark's prefill and decode loop of the 3B models at batch 1 (6 expert rows: far
  below the kernels' 128-row tile) and 256, through the Mosaic GPU expert kernels (forced:
  this host is a CPU) and the decode loop through `all_experts`, `capacity` and (at 256,
  unrolled) `capacity_kernel` (with the Triton route kernel, its default), trace and lower
  for CUDA: what would first fail on the H200."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg

  import pallas_kernels
  from pallas_kernels import gpu
  from mohge_jax.model import Transformer
  from mohge_jax.trainer import graph_def
  monkeypatch.setattr(pallas_kernels, "get_ops", lambda *a, **k: gpu.GpuOps(num_sms=132))
  # Triton's lowering asks the device for its compute capability: this host has none
  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion("NVIDIA H100"))
  monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: info)
  resolve = dispatch.resolve_backend
  monkeypatch.setattr(dispatch, "resolve_backend",
                      lambda b, *a: "pallas" if b == "auto" else resolve(b, *a))
  cfg = load_config(str(ROOT / config))
  graphdef = graph_def(cfg)
  state = jax.eval_shape(lambda: jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(
      Transformer(cfg, rngs=nnx.Rngs(0)))))
  P, N = 512, 128
  for B in (1, 256):
    prompts, lengths = (jax.ShapeDtypeStruct(s, jnp.int32) for s in ((B, P), (B,)))
    prefill = jax.jit(decode.make_prefill(cfg, graphdef, P + N)).trace(state, prompts, lengths)
    _, caches = prefill.out_info
    text = prefill.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    for backend in (None, "all_experts", "capacity"):
      text = jax.jit(decode.make_decode(cfg, graphdef, N, backend)).trace(
          state, None, lengths, lengths, caches).lower(lowering_platforms=("cuda",)).as_text()
      assert ("mosaic_gpu" in text) == (backend is None)
    if B == 1:  # the unrolled layout over separate per-layer buffers
      layers = jax.eval_shape(lambda s: gen.unstack_layers(nnx.merge(graphdef, s)), state)
      text = jax.jit(decode.make_decode(cfg, graphdef, N, None)).trace(
          state, layers, lengths, lengths, jax.eval_shape(gen.unstack_caches, caches)).lower(
              lowering_platforms=("cuda",)).as_text()
      assert "mosaic_gpu" in text
    else:  # ... with the decode experts' kernel (`slot_gpu`) over stacked, tiled weights
      layers = jax.eval_shape(lambda s: gen.unstack_layers(nnx.merge(graphdef, s),
                                                           stack_experts=True), state)
      text = jax.jit(decode.make_decode(cfg, graphdef, N, "capacity_kernel", head="kernel")
                     ).trace(state, layers, lengths, lengths,
                             jax.eval_shape(gen.unstack_caches, caches)).lower(
                                 lowering_platforms=("cuda",)).as_text()
      assert "mosaic_gpu" in text
      assert "route_tokens" in text and "route_slots" in text   # the Triton route kernel
      assert "greedy_head_kernel" in text   # the output layer's argmax in its epilogue
      # the dropless slot block: no overflow cond around the kernels (a CUDA-graph
      # conditional on the H200, ~20 us a layer)
      assert "stablehlo.case" not in text and "stablehlo.if" not in text


def test_backend_names_are_generates():
  """--decode-backends takes generate's names: model (model.expert_backend, resolved),
  auto (generate's per-batch choice, recorded with what it chose), or a backend itself."""
  m = load_config(str(ROOT / "configs/mohge_3b.yaml")).model
  assert decode._backend_name(m, "capacity", 1) == "capacity"
  for batch in (1, 32, 256):
    assert decode._backend_name(m, "auto", batch) == \
        f"auto: {gen.decode_expert_backend(m, batch)}"
  assert decode._backend_name(m, "auto", 256) == "auto: capacity"  # 256*K >= 8*E
  assert decode._backend_name(m, "auto", 1) == "auto: all_experts"
  assert decode._backend_name(m, None, 1) == dispatch.resolve_backend(
      m.expert_backend, m.group_widths, m.d_model)


def test_decode_experts_benchmark_runs_and_checks_the_kernels(tmp_path):
  """benchmarks.decode_experts on a kernel-sized tiny MoHGE (interpreter): a row per backend
  and tuning (a tuning, then with --parts the default's projections apart, with and without
  their products), the kernels' first-layer output within bf16 of XLA's capacity path."""
  from benchmarks import decode_experts
  out = tmp_path / "experts.json"
  assert decode_experts.main([
      "--config", str(ROOT / "configs/tiny.yaml"), "--batches", "64", "--reps", "1", "--interpret",
      "--layers", "2", "--tunings", "steps=2", "--out", str(out),
      "model.group_widths=[128,256]"]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["backend"] for r in rows] == ["capacity", "capacity_kernel[steps=2]",
                                          "all_experts"]
  for r in rows[1:]:
    assert r["rel_err_vs_capacity"] < 2e-2, r
  assert decode_experts.main([   # --parts: the slot kernel's projections apart
      "--config", str(ROOT / "configs/tiny.yaml"), "--batches", "64", "--reps", "1", "--interpret",
      "--layers", "1", "--backends", "capacity_kernel", "--parts", "--out", str(out),
      "model.group_widths=[128,256]"]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["backend"] for r in rows] == ["capacity_kernel[default]"] + [
      f"slot_{p}[default]{a}" for p in ("up", "down") for a in ("", ":no_mma")]
  assert all(0 < r["fraction_of_bandwidth"] and r["limit_ms"] > 0 for r in rows)


def test_backend_labels_carry_the_kernel_tuning():
  from benchmarks import decode
  assert decode._backend_and_tuning("auto") == ("auto", None)
  assert decode._backend_and_tuning(None) == (None, None)
  assert decode._backend_and_tuning("capacity_kernel[kernel=hgmm+bk=64]") == (
      "capacity_kernel", {"kernel": "hgmm", "bk": 64})
  with pytest.raises(ValueError, match="expected name\\[key=value"):
    decode._backend_and_tuning("capacity_kernel[bk=64")
  with pytest.raises(ValueError, match="'bk64': expected key=value joined by"):
    decode._backend_and_tuning("capacity_kernel[bk64]")
