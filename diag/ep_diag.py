import sys
import jax, jax.numpy as jnp, numpy as np
from mohge_jax import collectives, expert_parallel, sharding
from mohge_jax.config import MeshConfig
from mohge_jax.experts import dispatch_and_combine
jax.config.update("jax_default_matmul_precision", "highest")
R = 2
rng = np.random.default_rng(0)
G, N, K, D, T = 2, R, 3, 8, 6 * R
ep_mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, expert=R, tensor=1), jax.devices()[:R])
x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
ids = jnp.asarray(np.stack([rng.choice(G * N, K, replace=False) for _ in range(T)]), jnp.int32)
wts = jnp.asarray(rng.random((T, K)), jnp.float32)
wgu = [jnp.asarray(rng.standard_normal((N, D, 2 * w)) / 3, jnp.float32) for w in (4, 8)]
wd = [jnp.asarray(rng.standard_normal((N, w, D)) / 3, jnp.float32) for w in (4, 8)]
ct = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
orig = collectives.ragged_all_to_all
def fresh(operand, output, *a, **k):  # output buffer made data-dependent (not a constant)
  return orig(operand, output + 0 * operand.reshape(-1)[0], *a, **k)
def run(impl, comm="all_to_all", placement="all_size"):
  def parallel(x, wts, wgu, wd):
    return expert_parallel.routed_experts(x, ids, wts, wgu, wd, mesh=ep_mesh, experts_per_group=N,
                                          comm=comm, backend="reference", a2a_impl=impl,
                                          placement=placement)
  y, pb = jax.vjp(jax.jit(parallel), x, wts, wgu, wd)
  return jax.device_get((y, jax.jit(pb)(ct)))
def single(x, wts, wgu, wd):
  return dispatch_and_combine(x, ids, wts, wgu, wd, G * N, backend="reference")
y, pb = jax.vjp(jax.jit(single), x, wts, wgu, wd)
want = jax.device_get((y, pb(ct)))
def report(name, got):
  names = ["y", "dx", "dw", "dwgu0", "dwgu1", "dwd0", "dwd1"]
  errs = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  print(name, " ".join(f"{n}={e:.1e}" for n, e in zip(names, errs)), flush=True)
for name in sys.argv[1].split(","):
  if name == "fresh":
    collectives.ragged_all_to_all = fresh; expert_parallel.collectives.ragged_all_to_all = fresh
    report(name, run("lax"))
    collectives.ragged_all_to_all = orig; expert_parallel.collectives.ragged_all_to_all = orig
  elif name == "naive":
    report(name, run("lax", placement="naive"))
  elif name == "all_gather":
    report(name, run("lax", "all_gather"))
  else:
    report(name, run(name))
