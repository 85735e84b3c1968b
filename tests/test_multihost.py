"""Multi-host runs on one machine: two `jax.distributed` processes on 127.0.0.1 (CPU, gloo),
each with two fake devices and its own rows, against one process holding the whole batch.

The processes run this file as a script (see `__main__` at the bottom); every one is
killed, and the test failed with its output, if it outlives its timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mohge_jax import distributed, integrity
from conftest import xla_flags

ACCUM, ROWS, D = 2, 8, 3       # batch [accum, rows, D], rows split over processes then devices
STEPS, LR = 5, 0.1
TIMEOUT_S = 90
LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT", "MOHGE_DISTRIBUTED")


# ----------------------------------------------------------------------------- the workers


def _problem() -> dict[str, np.ndarray]:
  """A linear regression batch, the same in every process."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((ACCUM, ROWS, D)).astype(np.float32)
  y = x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1 * rng.standard_normal((ACCUM, ROWS))
  return {"x": x, "y": y.astype(np.float32)}


def _fit(batch: dict[str, jax.Array], mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
  """SGD on the mean squared error over the whole (sharded) batch: cross-device gradients."""
  replicated = NamedSharding(mesh, P())

  @jax.jit
  def step(w, b):
    loss, g = jax.value_and_grad(lambda w: jax.numpy.mean((b["x"] @ w - b["y"]) ** 2))(w)
    return jax.lax.with_sharding_constraint(w - LR * g, replicated), loss

  w = jax.jit(lambda: jax.numpy.zeros(D), out_shardings=replicated)()
  for _ in range(STEPS):
    w, loss = step(w, batch)
  return w, loss


def _worker(role: str, ckpt_dir: str) -> dict:
  """role "process": one of two distributed processes; "single": the whole batch alone."""
  from mohge_jax.checkpoint import Checkpointer
  started = distributed.maybe_initialize()
  n, p = jax.process_count(), jax.process_index()
  # The trainer's layout: [accum, rows, ...], rows split over several mesh axes.
  mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))
  full = _problem()
  rows = ROWS // n
  local = {k: v[:, p * rows:(p + 1) * rows] for k, v in full.items()}
  batch = distributed.global_batch(local, sharding)
  assert batch["x"].shape == full["x"].shape and batch["x"].sharding == sharding
  # Each process's devices hold exactly its own rows, in process order.
  for s in batch["x"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(s.data), full["x"][s.index])
  w, loss = _fit(batch, mesh)
  out = {"started": started, "processes": n, "process": p, "devices": jax.device_count(),
         "main": distributed.is_main_process(), "fully_addressable": batch["x"].is_fully_addressable,
         "w": np.asarray(w).tolist(), "loss": float(loss),
         "any": [distributed.any_process(p == n - 1), distributed.any_process(False)]}
  if role == "process":
    with Checkpointer(ckpt_dir, keep=1) as ckpt:  # async save, as the trainer does
      ckpt.save(STEPS, {"w": w, "x": batch["x"]}, {"step": STEPS, "processes": n})
  else:
    target = {"w": jax.ShapeDtypeStruct((D,), np.float32, sharding=NamedSharding(mesh, P())),
              "x": jax.ShapeDtypeStruct(full["x"].shape, np.float32, sharding=sharding)}
    with Checkpointer(ckpt_dir, keep=1) as ckpt:
      state, meta = ckpt.restore(None, target)
    out["restored_w"] = np.asarray(state["w"]).tolist()
    out["restored_x_equal"] = bool(np.array_equal(np.asarray(state["x"]), full["x"]))
    out["restored_meta"] = meta
  return out


# ----------------------------------------------------------------------------- the harness


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in LAUNCH_ENV and not k.startswith(("SLURM_", "TPU_", "MEGASCALE_"))}
  root = str(Path(__file__).resolve().parents[1])  # this checkout's package, not an installed one
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root,
          "XLA_FLAGS": xla_flags(devices), **extra}


def _run_all(cmds_envs: list[tuple[list[str], dict]], tmp: Path) -> list[dict]:
  """Starts all commands at once; their JSON result lines. Kills all and fails on a timeout,
  or as soon as one fails (its peers would wait for it)."""
  logs = [tempfile.TemporaryFile("w+", dir=tmp) for _ in cmds_envs]
  procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
           for (cmd, env), log in zip(cmds_envs, logs)]

  def output(i: int) -> str:
    logs[i].seek(0)
    return logs[i].read()

  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
      if time.monotonic() > deadline:
        pytest.fail(f"timed out after {TIMEOUT_S}s:\n" + "\n".join(
            f"--- process {i}:\n{output(i)[-3000:]}" for i in range(len(procs))))
      time.sleep(0.1)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  texts = [output(i) for i in range(len(procs))]
  assert all(p.returncode == 0 for p in procs), "\n".join(
      f"--- process {i} exited with {p.returncode}:\n{texts[i][-3000:]}"
      for i, p in enumerate(procs))
  results = []
  for i, text in enumerate(texts):
    lines = [l for l in text.splitlines() if l.startswith("{")]
    assert lines, f"process {i} printed no result:\n{text[-5000:]}"
    results.append(json.loads(lines[-1]))
  return results


def test_two_processes_equal_one_and_checkpoint_restores_in_one(tmp_path):
  ckpt_dir = str(tmp_path / "ckpt")
  port = _free_port()
  script = [sys.executable, __file__]
  procs = _run_all([(script + ["process", ckpt_dir],
                     _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID=str(i)))
                    for i in range(2)], tmp_path)
  [single] = _run_all([(script + ["single", ckpt_dir], _env(4))], tmp_path)

  for i, r in enumerate(procs):
    assert (r["started"], r["processes"], r["process"], r["devices"]) == (True, 2, i, 4)
    assert r["main"] == (i == 0) and not r["fully_addressable"]
    assert r["any"] == [True, False]  # process 1's True reached process 0
  assert (single["started"], single["processes"], single["devices"]) == (False, 1, 4)
  assert single["fully_addressable"] and single["any"] == [True, False]
  assert procs[0]["w"] == procs[1]["w"]
  np.testing.assert_allclose(procs[0]["w"], single["w"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(procs[0]["loss"], single["loss"], rtol=1e-6)
  assert abs(single["w"][0] - 0.0) > 0.1, "SGD did not move: the comparison proves nothing"
  # Written by both processes together (rows 4-7 of x were only on process 1), read by one.
  assert single["restored_w"] == procs[0]["w"]
  assert single["restored_x_equal"]
  assert single["restored_meta"] == {"step": STEPS, "processes": 2}
  # Process 0 sealed the step with checksums of every file, process 1's included.
  step_dir = Path(ckpt_dir) / str(STEPS)
  listed = set(json.loads((step_dir / integrity.MANIFEST).read_text())["files"])
  on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
  assert listed == on_disk - integrity.NOT_COVERED and any("process_1" in n for n in listed)


def test_single_process_does_nothing(monkeypatch):
  for k in list(os.environ):
    if k in LAUNCH_ENV or k.startswith(("SLURM_", "TPU_", "MEGASCALE_")):
      monkeypatch.delenv(k)
  assert distributed.maybe_initialize() is False
  assert not jax.distributed.is_initialized()
  monkeypatch.setenv("SLURM_STEP_ID", "0")           # a one-task srun step
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
  assert distributed.maybe_initialize() is False
  monkeypatch.setenv("MOHGE_DISTRIBUTED", "0")
  assert distributed.maybe_initialize("127.0.0.1:1", 2, 0) is False
  monkeypatch.delenv("MOHGE_DISTRIBUTED")
  assert distributed.maybe_initialize("127.0.0.1:1", 1, 0) is False
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()


def test_slurm_settings(monkeypatch):
  for k in list(os.environ):
    if k in LAUNCH_ENV or k.startswith("SLURM_"):
      monkeypatch.delenv(k)
  env = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[007-008]",
         "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  # One task per node: explicit settings, so jax does not restrict it to GPU SLURM_LOCALID.
  assert distributed._slurm_one_task_per_node() == {
      "coordinator_address": f"gpu007:{1234 % 4096 + 61440}", "num_processes": 2,
      "process_id": 1, "cluster_detection_method": "deactivate"}
  monkeypatch.setenv("JAX_COORDINATOR_PORT", "5555")
  assert distributed._slurm_one_task_per_node()["coordinator_address"] == "gpu007:5555"
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # two per node: jax's own detection
  assert distributed._slurm_one_task_per_node() == {}
  assert distributed._slurm_tasks() == 4 and not distributed._tpu_pod()


def test_incomplete_settings_are_refused(monkeypatch):
  for k in LAUNCH_ENV:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    distributed.maybe_initialize()
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(ValueError, match="not an integer"):
    distributed.maybe_initialize()
  assert not jax.distributed.is_initialized()


def test_global_batch_in_one_process_is_device_put():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  local = {"x": np.arange(2 * 4 * jax.device_count() * 3).reshape(2, 4 * jax.device_count(), 3)}
  for spec in (P(None, "data"), P()):
    out = distributed.global_batch(local, NamedSharding(mesh, spec))
    assert out["x"].sharding == NamedSharding(mesh, spec)
    np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])


if __name__ == "__main__":
  print(json.dumps(_worker(sys.argv[1], sys.argv[2])), flush=True)


def test_train_py_on_two_processes_matches_one(tmp_path):
  """`train.py` launched as two jax.distributed processes (2 CPU devices each, expert
  parallel over both) trains to the loss of one process with 4 devices."""
  root = Path(__file__).resolve().parents[1]
  micro = ["model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
           "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
           "model.dense_ffn_width=32", "model.group_widths=[8,16]", "model.experts_per_group=4",
           "model.top_k_groups=2", "model.top_k=3", "model.num_layers=2", "train.batch_size=8",
           "train.seq_len=16", "train.log_every=2", "train.eval_batches=1", "mesh.expert=2",
           f"data.cache_dir={tmp_path / 'cache'}"]

  def cmd(workdir):
    return [sys.executable, "-c",
            "import json, sys, train; print(json.dumps({'code': train.main(sys.argv[1:])}))",
            "--config", str(root / "configs/tiny.yaml"), "--workdir", str(workdir),
            "--steps", "4", *micro]

  port = _free_port()
  multi = [(cmd(tmp_path / "multi"), _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                          JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                          PYTHONPATH=str(root))) for i in range(2)]
  assert [r["code"] for r in _run_all(multi, tmp_path)] == [0, 0]
  assert _run_all([(cmd(tmp_path / "one"), _env(4, PYTHONPATH=str(root)))],
                  tmp_path)[0]["code"] == 0
  two = json.loads((tmp_path / "multi" / "summary.json").read_text())
  one = json.loads((tmp_path / "one" / "summary.json").read_text())
  assert two["step"] == one["step"] == 4
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
  # Only the first host writes the metrics; it has every logged step once.
  steps = [json.loads(l)["step"] for l in (tmp_path / "multi" / "metrics.jsonl").read_text()
           .splitlines()]
  assert steps == [2, 4]
