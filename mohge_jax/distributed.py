"""Multi-host runs: start `jax.distributed`, build global batches from per-host rows.

    from mohge_jax import distributed
    distributed.maybe_initialize()        # first thing, before any jax computation
    ...
    batch = distributed.global_batch(local_rows, NamedSharding(mesh, P(None, "data")))
    if distributed.is_main_process(): print(...)
    stop = distributed.any_process(caught_sigterm)   # the same answer on every process

`maybe_initialize` starts the distributed system when this is one process of several,
found from (first match wins):
  1. its arguments;
  2. JAX_COORDINATOR_ADDRESS ("host:port" of process 0), JAX_NUM_PROCESSES and
     JAX_PROCESS_ID, all three set (a launcher of your own, or localhost tests);
  3. SLURM: an `srun` step of several tasks (SLURM_STEP_NUM_TASKS > 1). jax picks the
     coordinator (first node of the step; port from SLURM_JOB_ID, or JAX_COORDINATOR_PORT).
     With one task per node each process sees all of its node's GPUs; with several, task
     i of a node sees GPU i (jax's default; JAX_LOCAL_DEVICE_IDS overrides);
  4. Cloud TPU pod slices (several hosts, found from TPU_WORKER_HOSTNAMES,
     TPU_PROCESS_ADDRESSES(_PATH) or the GCE metadata server, as jax does), multislice
     via MEGASCALE_* included.
MOHGE_DISTRIBUTED=0 turns all of this off; MOHGE_DISTRIBUTED=1 calls
`jax.distributed.initialize()` even when nothing above matched, so jax's own detection
(Open MPI, Kubernetes, ...) applies. jax itself also reads JAX_LOCAL_DEVICE_IDS
("0,1": the GPUs this process uses) and JAX_COORDINATOR_BIND_ADDRESS.

Every process runs the same program; arrays span all processes' devices; each process
feeds its own rows (`global_batch`); orbax checkpoints are written by all processes
together into one directory that every host sees (a shared filesystem or a bucket).
"""

from __future__ import annotations

import os

import jax
import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_SWITCH = "MOHGE_DISTRIBUTED"


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Starts `jax.distributed` if this is one process of a multi-process run; True if it did.

  Call it before anything touches a jax backend (devices, arrays, jit). A single-process
  run (no arguments, no launcher environment) does nothing and returns False, as does a
  second call once initialised.
  """
  if jax.distributed.is_initialized():
    return False
  switch = os.environ.get(ENV_SWITCH, "").strip().lower()
  if switch in ("0", "off", "false", "no"):
    return False
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  explicit = (coordinator, num_processes, process_id)
  kwargs = {}
  if all(v is not None for v in explicit):
    if num_processes <= 1:
      return False
    kwargs["cluster_detection_method"] = "deactivate"  # so no launcher overrides it
  elif any(v is not None for v in explicit) and switch not in ("1", "on", "true", "yes"):
    raise ValueError(
        f"incomplete multi-process settings: coordinator={coordinator!r}, "
        f"num_processes={num_processes}, process_id={process_id}; give all three "
        f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
  elif _slurm_tasks() > 1:
    kwargs.update(_slurm_one_task_per_node())
  elif not (_tpu_pod() or switch in ("1", "on", "true", "yes")):
    return False
  # Cross-process collectives on CPU (tests, CPU clusters); GPU and TPU backends ignore it.
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{"coordinator_address": coordinator,
                                "num_processes": num_processes, "process_id": process_id,
                                **kwargs})
  return True


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of each array -> global arrays laid out by `sharding`.

  `sharding`'s spec shards exactly one dimension, over one mesh axis or several (e.g.
  P(None, ("data", "fsdp")) for [accum, B, L] batches). Globally that dimension is
  process_count times the local one: every process holds different rows, none are
  replicas (else jax raises). Where a process's rows go is where its devices sit on the
  mesh: block `process_index` when each process's devices are together, in process order
  (CPU, tested; GPU meshes from `jax.make_mesh` over `jax.devices()` order them so). That
  matches the data iterator (process p: rows [p*B, (p+1)*B)). Other device orders (TPU
  topologies) permute rows across the global batch, which a mean loss does not see.
  One process: the same arrays as `jax.device_put(v, sharding)`, replicated specs too.
  """
  dims = [i for i, axes in enumerate(sharding.spec) if axes is not None]
  n = jax.process_count()
  if len(dims) != 1 and n > 1:
    raise ValueError(f"global_batch needs a sharding of exactly one dimension, got {sharding.spec}"
                     " (a replicated batch would need the same rows on every process)")
  out = {}
  for k, v in local_batch.items():
    shape = list(v.shape)
    if dims:
      shape[dims[0]] *= n
    out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
  return out


def is_main_process() -> bool:
  """True on process 0: the one that prints and writes metrics and summaries."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any one of them.

  For what one process learns alone (a SIGTERM it caught) that all must act on at the
  same step: every process must call it at the same points. One process: `flag`, free;
  several: one tiny all-gather, and the host waits for the device work queued before it.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


def _env_int(name: str) -> int | None:
  v = os.environ.get(name, "").strip()
  if not v:
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"{name}={v!r} is not an integer") from None


def _slurm_tasks() -> int:
  """Tasks of this srun step (0 outside one: a bare sbatch script is one process)."""
  if "SLURM_STEP_ID" not in os.environ or "SLURM_STEP_NODELIST" not in os.environ:
    return 0
  return _env_int("SLURM_STEP_NUM_TASKS") or 0


def _slurm_one_task_per_node() -> dict:
  """jax gives task i of a node only GPU i; with one task per node keep all the node's GPUs."""
  tasks = _slurm_tasks()
  nodes = _env_int("SLURM_STEP_NUM_NODES") or _env_int("SLURM_NNODES")
  if nodes == tasks and not os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    from jax._src.clusters import SlurmCluster
    port = os.environ.get("JAX_COORDINATOR_PORT")
    return {"coordinator_address": SlurmCluster.get_coordinator_address(None, port),
            "num_processes": tasks, "process_id": SlurmCluster.get_process_id(),
            "cluster_detection_method": "deactivate"}
  return {}


def _tpu_pod() -> bool:
  """A Cloud TPU VM that is one of several hosts (jax's GKE env vars or GCE metadata)."""
  from jax._src import cloud_tpu_init, clusters
  if not cloud_tpu_init.running_in_cloud_tpu_vm:
    return False
  for env in (clusters.GkeTpuCluster, clusters.GceTpuCluster):
    if env.is_env_present():
      return env.get_process_count() > 1
  return False
