"""The expert-parallel layer and a full training step equal the single-device model
(8 fake CPU devices, set up in conftest.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import pytest
from flax import nnx

from mohge_jax import allocation, expert_parallel, sharding
from mohge_jax.config import ConfigError, MeshConfig, load_config
from mohge_jax.experts import RoutedFFN
from pallas_kernels.ffn import Ops
from test_train import assert_same_step, batch_of

LAYER = ["model.d_model=16", "model.group_widths=[8,16,24,32]", "model.experts_per_group=8",
         "model.top_k_groups=2", "model.top_k=5", "model.num_shared_experts=1",
         "model.shared_expert_width=8", "model.init_std=0.3", "model.expert_backend=tiled"]
CASES = [  # (data, fsdp, expert), exchange, placement: EP 2, 4, 8, mixed meshes
    ((1, 1, 2), "all_to_all", "all_size"), ((1, 1, 4), "all_gather", "all_size"),
    ((1, 1, 8), "all_to_all", "all_size"), ((2, 1, 4), "all_to_all", "all_size"),
    ((4, 1, 2), "all_gather", "all_size"), ((2, 2, 2), "all_to_all", "all_size"),
    ((1, 1, 4), "all_to_all", "naive"), ((2, 1, 2), "all_gather", "naive")]


def mesh_of(data, fsdp, expert, comm="all_to_all"):
  m = MeshConfig(data=data, fsdp=fsdp, expert=expert, expert_comm=comm)
  return sharding.make_mesh(m, jax.devices()[:data * fsdp * expert]), m


@pytest.mark.parametrize("shape,comm,placement", CASES)
def test_sharded_layer_equals_single_device(rng, shape, comm, placement):
  check_sharded_layer(rng, shape, comm, placement, "tiled")


@pytest.mark.parametrize("shape,comm,placement", [
    ((2, 1, 4), "all_to_all", "all_size"), ((2, 2, 2), "all_gather", "all_size"),
    ((2, 1, 2), "all_to_all", "naive")])
def test_sharded_layer_through_the_kernels_custom_vjp(rng, shape, comm, placement):
  """backend=pallas (on CPU its pure-JAX ops, through the same custom VJP as the GPU
  kernels): under shard_map the weight gradients vary over the batch axes while the
  weights do not; the layer must still match one device (it failed to differentiate)."""
  check_sharded_layer(rng, shape, comm, placement, "pallas")


@pytest.mark.parametrize("comm", ["all_to_all", "all_gather"])
def test_gpu_kernels_trace_under_shard_map(monkeypatch, comm):
  """The Mosaic GPU kernels (forced, traced on CPU: their pallas_calls' outputs vary over
  no mesh axis) inside the sharded layer's forward and backward: the custom VJP's
  cotangents must be typed like its inputs (this failed on the H200s only)."""
  import pallas_kernels
  from pallas_kernels import gpu
  monkeypatch.setattr(pallas_kernels, "get_ops", lambda *a, **k: gpu.GpuOps(num_sms=132, **k))
  G, N, D, T, K = 2, 4, 128, 64, 2
  mesh, _ = mesh_of(2, 1, 2, comm)
  wgu = [jnp.zeros((N, D, 2 * w), jnp.bfloat16) for w in (128, 256)]
  wd = [jnp.zeros((N, w, D), jnp.bfloat16) for w in (128, 256)]
  ids = jnp.zeros((T, K), jnp.int32)

  def loss(x, w, wgu, wd):
    return jnp.sum(expert_parallel.routed_experts(
        x, ids, w, wgu, wd, mesh=mesh, experts_per_group=N, comm=comm, backend="pallas",
        a2a_impl="lax"))
  with jax.set_mesh(mesh):
    text = str(jax.jit(jax.grad(loss, (0, 1, 2, 3))).trace(
        jnp.zeros((T, D), jnp.bfloat16), jnp.zeros((T, K)), wgu, wd).jaxpr)
  assert "kernel_name" in text  # the Mosaic GPU kernels were traced

  # The kernels' output varies like their rows. Typed invariant (as a pallas_call's is),
  # autodiff would sum its cotangent over the devices: wrong gradients, right values.
  from pallas_kernels import ffn
  seen = []

  def body(x):
    y = ffn.expert_ffn_with(gpu.GpuOps(num_sms=132), x, jnp.full((G * N,), 4, jnp.int32),
                            wgu, wd)
    seen.append((jax.typeof(x).mat.varying, jax.typeof(y).mat.varying))
    return y
  jax.jit(jax.shard_map(body, mesh=mesh, in_specs=jax.P(sharding.BATCH_AXES),
                        out_specs=jax.P(sharding.BATCH_AXES))).trace(
      jnp.zeros((2 * T, D), jnp.bfloat16))
  assert seen and seen[0][0] and seen[0][1] == seen[0][0], seen


@pytest.mark.parametrize("comm,placement", [("all_to_all", "all_size"),
                                            ("all_to_all", "naive"),
                                            ("all_gather", "all_size")])
def test_training_step_lowers_for_gpus(monkeypatch, comm, placement):
  """The whole EP 2 training step of mohge_small, through the Mosaic GPU kernels and the
  real ragged all-to-all (both forced: this host is a CPU), traces and lowers for CUDA:
  what would otherwise first fail on the GPUs (types under shard_map, the exchanges'
  custom VJP, the kernels inside the scanned, rematerialised layers)."""
  import pallas_kernels
  from pallas_kernels import gpu
  from mohge_jax import collectives, dispatch
  from mohge_jax.trainer import abstract_state, graph_def, make_train_step
  monkeypatch.setattr(pallas_kernels, "get_ops", lambda *a, **k: gpu.GpuOps(num_sms=132, **k))
  resolve = dispatch.resolve_backend
  monkeypatch.setattr(dispatch, "resolve_backend",
                      lambda b, *a: "pallas" if b == "auto" else resolve(b, *a))
  impl = collectives._resolve_impl
  monkeypatch.setattr(collectives, "_resolve_impl", lambda i: "lax" if i == "auto" else impl(i))
  cfg = load_config("configs/mohge_small.yaml", [
      "train.batch_size=2", "train.seq_len=256", "train.grad_accum=1", "model.num_layers=3",
      "mesh.expert=2", "mesh.data=1", f"mesh.expert_comm={comm}",
      f"mesh.placement={placement}", "model.attention_impl=xla"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2])
  with jax.set_mesh(mesh):
    state = abstract_state(cfg, mesh)
    bs = sharding.batch_sharding(mesh, leading=1)
    batch = {k: jax.ShapeDtypeStruct((1, 2, 256), dt, sharding=bs) for k, dt in (
        ("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32),
        ("segment_ids", jnp.int32), ("positions", jnp.int32))}
    text = make_train_step(cfg, graph_def(cfg)).trace(state, batch).lower(
        lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  assert ("ragged_all_to_all" in text) == (comm == "all_to_all")


def check_sharded_layer(rng, shape, comm, placement, backend):
  mesh, mcfg = mesh_of(*shape, comm)
  cfg = load_config(None, LAYER + [f"mesh.expert={shape[2]}", f"mesh.expert_comm={comm}",
                                   f"mesh.placement={placement}",
                                   f"model.expert_backend={backend}"])
  layer = RoutedFFN(cfg, "mohge", rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = jnp.asarray(rng.normal(size=(8, 6, 16)), jnp.float32)
  graphdef, params = nnx.split(layer)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return jnp.sum(y * jnp.sin(y)) + aux["expert_aux"] + aux["group_aux"], (y, aux)

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (want_l, (want_y, want_aux)), want_g = f(params, x)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(sharding.BATCH_AXES)))
    ps = jax.device_put(params, sharding.state_shardings(params, mesh))
    (got_l, (got_y, got_aux)), got_g = f(ps, xs)
    hlo = f.lower(ps, xs).as_text()
  assert ("all_to_all" in hlo or "all-to-all" in hlo) if comm == "all_to_all" else (
      "reduce_scatter" in hlo or "reduce-scatter" in hlo)
  np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(got_l), float(want_l), rtol=1e-5)
  for k in ("expert_aux", "group_aux", "expert_tokens"):
    np.testing.assert_allclose(np.asarray(got_aux[k]), np.asarray(want_aux[k]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


class PoisonPadding(Ops):
  """The reference building blocks, with what the GPU kernels may leave in padding rows
  under zero_padding=False made explicit: NaN (in y, and through the backward's hgmm in
  the gradient of x)."""

  def hgmm(self, lhs, rhs, group_sizes, **kw):
    out = super().hgmm(lhs, rhs, group_sizes, **kw)
    if self.tuning.get("zero_padding", True):
      return out
    valid = jnp.arange(out.shape[0])[:, None] < jnp.sum(group_sizes)
    return jnp.where(valid, out, jnp.nan)


def test_padding_rows_left_unwritten_by_the_kernels_are_masked(rng, monkeypatch):
  """expert_parallel tells the Pallas kernels to skip its buffers' padding rows (half the
  rows at EP 2) and masks them itself: with NaN there (PoisonPadding) the sharded layer's
  output, losses and gradients still equal one device's. (all_gather: its combine reads
  the output's padding rows, and x's gradient rows pass through both exchanges' shared
  `_local_ffn`.)"""
  import pallas_kernels
  monkeypatch.setattr(pallas_kernels, "get_ops", lambda backend="auto", **t: PoisonPadding(**t))
  sizes = jnp.asarray([2, 0, 3, 1], jnp.int32)
  x = jnp.asarray(rng.normal(size=(9, 16)), jnp.float32)
  wgu = [jnp.asarray(rng.normal(size=(2, 16, 16)), jnp.float32) for _ in range(2)]
  wd = [jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32) for _ in range(2)]
  poisoned = pallas_kernels.expert_ffn(x, sizes, wgu, wd, zero_padding=False)
  assert np.isnan(np.asarray(poisoned)[6:]).all()  # the poison is there to be masked
  check_sharded_layer(rng, (2, 1, 2), "all_gather", "all_size", "pallas")


def test_local_layout_is_the_all_size_allocation():
  """Device r holds experts [r*N/EP, (r+1)*N/EP) of every group: allocation.place's blocks."""
  G, N = 8, 8
  widths = tuple(range(384, 1281, 128))
  for ep in (1, 2, 4, 8):
    owner, local = expert_parallel._owner_and_local(jnp.arange(G * N), experts_per_group=N,
                                                    ep=ep)
    placement = allocation.place(widths, N, ep)
    assert [sorted(ids) for ids in placement.experts_by_rank] == [
        sorted(np.flatnonzero(np.asarray(owner) == r).tolist()) for r in range(ep)]
    # local ids are group-major and dense on every device
    for r in range(ep):
      mine = np.flatnonzero(np.asarray(owner) == r)
      np.testing.assert_array_equal(np.asarray(local)[mine], np.arange(G * N // ep))


@pytest.mark.parametrize("shape,comm,tensor", [((1, 1, 8), "all_to_all", 1),
                                               ((2, 2, 2), "all_gather", 1),
                                               ((1, 2, 2), "all_to_all", 2)])
def test_full_training_step_equals_single_device(rng, shape, comm, tensor):
  from mohge_jax.trainer import make_init_fn, make_train_step, graph_def
  cfg = load_config("configs/tiny.yaml", [
      "model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
      "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
      "model.dense_ffn_width=32", "model.group_widths=[8,16]", "model.experts_per_group=8",
      "model.top_k_groups=2", "model.top_k=3", "model.num_layers=2", "train.batch_size=8",
      "train.seq_len=16", f"mesh.expert={shape[2]}", f"mesh.fsdp={shape[1]}",
      f"mesh.expert_comm={comm}", f"mesh.tensor={tensor}", "model.expert_backend=tiled",
      "loss.group_aux_start_step=0"])
  # Rows with very different numbers of scored tokens: the token weighting is global.
  mask = rng.random((8, 16)) > 0.1
  mask[:4] &= rng.random((4, 16)) < 0.2
  batch = batch_of(rng.integers(0, 257, size=(8, 17)), mask)
  step = make_train_step(cfg, graph_def(cfg))
  state = jax.jit(make_init_fn(cfg))()
  before = jax.tree.map(np.asarray, state["params"])
  want = step(jax.tree.map(jnp.copy, state), batch)
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    st = jax.device_put(state, sharding.state_shardings(state, mesh))
    b = jax.device_put(batch, sharding.batch_sharding(mesh, leading=1))
    got = step(st, b)
  for k in ("loss", "lm_loss", "group_aux", "expert_aux", "grad_norm"):
    np.testing.assert_allclose(float(got[1][k]), float(want[1][k]), rtol=2e-5, err_msg=k)
  assert float(want[1]["group_aux"]) > 0
  assert_same_step(before, got, want)


def test_parameter_shardings_follow_the_rules():
  cfg = load_config("configs/tiny.yaml", ["mesh.expert=4", "mesh.fsdp=2"])
  mesh = sharding.make_mesh(cfg.mesh)
  from mohge_jax.trainer import abstract_state
  st = abstract_state(cfg, mesh)
  params = st["params"]
  # Stacked layers: a leading, unsharded layer axis.
  routed = params["stacks"][1]["layers"]["ffn"]
  assert routed["w_gate_up"][0].sharding.spec == jax.P(None, "expert", "fsdp", None)
  assert routed["w_down"][2].sharding.spec == jax.P(None, "expert", None, "fsdp")
  assert params["stacks"][0]["layers"]["ffn"]["w_gate_up"].sharding.spec == jax.P(None, "fsdp", None)
  assert params["embed"].sharding.spec == jax.P(None, "fsdp")
  # Adam moments mirror the parameters.
  mu = st["opt_state"][1][0].mu
  assert mu["stacks"][1]["layers"]["ffn"]["w_gate_up"][0].sharding.spec == jax.P(
      None, "expert", "fsdp", None)


def test_mesh_errors():
  with pytest.raises(ConfigError, match="does not match the 8 devices"):
    sharding.make_mesh(MeshConfig(data=2, expert=2))
  with pytest.raises(ConfigError, match="cannot be split"):
    sharding.make_mesh(MeshConfig(data=-1, expert=3))
  with pytest.raises(ConfigError, match="mesh.expert=3 must divide model.experts_per_group=4"):
    load_config("configs/tiny.yaml", ["mesh.expert=3"])
  with pytest.raises(ConfigError, match="must divide the number of groups 4"):
    load_config("configs/tiny.yaml", ["mesh.expert=8", "mesh.placement=naive"])
  with pytest.raises(ConfigError, match="per_expert .* does not run under expert parallelism"):
    load_config("configs/tiny.yaml", ["mesh.expert=2", "model.expert_backend=per_expert"])
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    load_config("configs/tiny.yaml", ["mesh.fsdp=-1"])


@pytest.mark.parametrize("ep,k,want", [(2, 5, "all_gather"), (4, 5, "all_gather"),
                                       (8, 5, "all_to_all"), (2, 2, "all_to_all")])
def test_auto_exchange_is_all_gather_below_top_k(rng, ep, k, want):
  """mesh.expert_comm=auto (the default): the lowered layer runs the all-gather exchange
  while the expert axis is smaller than top_k, the ragged all-to-all from there on."""
  assert MeshConfig().expert_comm == "auto"
  assert expert_parallel.resolve_comm("auto", ep, k) == want
  assert expert_parallel.resolve_comm("all_to_all", 2, 8) == "all_to_all"
  G, N, D, T = 2, 8, 16, 32
  mesh, _ = mesh_of(1, 1, ep)
  wgu = [jnp.asarray(rng.normal(size=(N, D, 2 * w)), jnp.float32) for w in (8, 16)]
  wd = [jnp.asarray(rng.normal(size=(N, w, D)), jnp.float32) for w in (8, 16)]
  ids = jnp.asarray(np.stack([rng.choice(G * N, k, replace=False) for _ in range(T)]),
                    jnp.int32)
  f = jax.jit(lambda x, w: expert_parallel.routed_experts(
      x, ids, w, wgu, wd, mesh=mesh, experts_per_group=N, comm="auto", backend="tiled"))
  text = f.lower(jnp.ones((T, D)), jnp.ones((T, k))).as_text()
  # (on CPU the ragged exchange is emulated; its sizes still go through an all_to_all)
  assert ("all_to_all" in text) == (want == "all_to_all")
  assert ("reduce_scatter" in text) == (want == "all_gather")
  if want == "all_gather":  # the partial sums travel in the activations' dtype (bf16: half)
    text = f.lower(jnp.ones((T, D), jnp.bfloat16), jnp.ones((T, k))).as_text()
    at = text.index("stablehlo.reduce_scatter")  # its operand type ends the op's region
    operand = re.search(r"\}\) : \(tensor<([^>]*)>\)", text[at:]).group(1)
    assert operand.endswith("xbf16"), operand


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (shard_map, custom VJPs, ...)."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


@pytest.mark.parametrize("comm", ["all_to_all", "all_gather"])
def test_pair_counts_need_no_more_bins_than_experts(rng, monkeypatch, comm):
  """Naive placement at EP 4 over 32 experts: the ragged exchange once counted its pairs
  over ep*E_l = 128 (rank, local expert) keys; at MoHGE-3B's size that one-hot count (128
  bins over 786k pairs) never finished compiling on the H200s. With count_ids made to
  count every width one-hot, no one-hot in the layer's forward and backward is wider
  than ONE_HOT_MAX_BINS (the layer counts over its 32 experts)."""
  from mohge_jax import dispatch
  limit = dispatch.ONE_HOT_MAX_BINS
  monkeypatch.setattr(dispatch, "ONE_HOT_MAX_BINS", 1 << 30)
  mesh, _ = mesh_of(1, 1, 4, comm)
  cfg = load_config(None, LAYER + ["mesh.expert=4", f"mesh.expert_comm={comm}",
                                   "mesh.placement=naive"])
  layer = RoutedFFN(cfg, "mohge", rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(layer)
  x = jnp.asarray(rng.normal(size=(8, 6, 16)), jnp.float32)
  f = jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x)[0]))
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(f)(params, x).jaxpr
  widths = [e.outvars[0].aval.shape[-1] for e in _eqns(jaxpr)
            if e.primitive.name == "eq" and e.outvars[0].aval.ndim == 2]
  assert widths, "no one-hot found: the test no longer looks where the counts are made"
  assert max(widths) <= limit, widths
