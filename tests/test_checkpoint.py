"""Tests for mohge_jax.checkpoint: round trips, keep-last-k, crash safety, resharding,
damage detection and fallback.

Tests that need a different number of fake CPU devices, or a process to kill, run this
file as a script in a subprocess (see `__main__` at the bottom).
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mohge_jax import checkpoint
from mohge_jax.checkpoint import CheckpointDamaged, CheckpointError, Checkpointer

# Scripts run from tests/ must import this checkout's package, not an installed copy.
SCRIPT_ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
              "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                             os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


class TinyMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(4, 8, rngs=rngs)
    self.down = nnx.Linear(8, 3, rngs=rngs)


def _random_tree(seed: int) -> dict:
  """A small nested pytree of fresh random arrays of several dtypes and containers."""
  rng = np.random.default_rng(seed)
  return {
    "w_DxF": jnp.asarray(rng.standard_normal((4, 8), dtype=np.float32)),
    "layers": [jnp.asarray(rng.integers(0, 99, (5,), dtype=np.int32)), (jnp.bfloat16(rng.random()),)],
  }


def _big_tree(seed: int) -> dict:
  """256 MB of incompressible bytes, so that writing it takes about a second."""
  rng = np.random.default_rng(seed)
  return {f"w{i}": jnp.asarray(rng.integers(0, 2**63, 4 << 20, dtype=np.uint64).view(np.uint32)) for i in range(8)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_trees_equal(got, want) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    if jax.dtypes.issubdtype(g.dtype, jax.dtypes.prng_key):
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, __file__, *args], env=SCRIPT_ENV, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.parametrize("pure_dict", [False, True], ids=["nnx_state", "pure_dict"])
def test_round_trip_model_optimizer_and_meta(tmp_path: Path, pure_dict: bool):
  seed = random.randrange(2**31)
  rng = np.random.default_rng(seed)
  # Weights from numpy rather than nnx initialisers: eager XLA compiles would cost seconds.
  graphdef, abstract_model = nnx.split(nnx.eval_shape(lambda: TinyMLP(nnx.Rngs(0))))
  model_state = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), abstract_model)
  params = nnx.to_pure_dict(model_state)
  tx = optax.adamw(1e-3)
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32), params)
  opt_state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[1])(grads, params)  # non-zero mu, nu
  extra = {**_random_tree(seed), "dropout_key": jax.random.key(seed)}  # a typed PRNG key array
  state = {"model": params if pure_dict else model_state, "opt": opt_state, "extra": extra}
  meta = {
    "data_position": {"shard": 3, "offset": seed},
    "rng_key": jax.random.key_data(jax.random.key(seed)).tolist(),
    "config": {"d_model": 8, "lr": 1e-3 * random.random(), "experts": [4, 2], "name": "tiny"},
  }

  # The target is built the way a trainer would: from shapes alone.
  target = {
    "model": nnx.to_pure_dict(abstract_model) if pure_dict else abstract_model,
    "opt": jax.eval_shape(lambda: opt_state),
    "extra": _abstract(state["extra"]),
  }
  with Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.save(10, state, meta)
    got_state, got_meta = ckpt.restore(None, target)
    assert ckpt.restore_meta() == meta

  _assert_trees_equal(got_state, state)
  assert got_meta == meta
  if pure_dict:
    nnx.replace_by_pure_dict(abstract_model, got_state["model"])
    got_model_state = abstract_model
  else:
    assert isinstance(got_state["model"], nnx.State)
    got_model_state = got_state["model"]
  model = nnx.merge(graphdef, got_model_state)
  np.testing.assert_array_equal(model.up.kernel[...], model_state["up"]["kernel"][...])


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_keeps_last_k_and_existing_step_is_noop(tmp_path: Path, async_save: bool):
  seeds = [random.randrange(2**31) for _ in range(5)]
  with Checkpointer(tmp_path, keep=2, async_save=async_save) as ckpt:
    for step, seed in enumerate(seeds, start=1):
      assert ckpt.save(step, _random_tree(seed), {"step": step})
    assert ckpt.latest_step() == 5
    assert ckpt.all_steps() == [4, 5]
    assert not ckpt.save(5, _random_tree(0), {"step": "again"})  # e.g. SIGTERM right after a save
    state, meta = ckpt.restore(4, _random_tree(0))  # arrays work as a target too
    assert ckpt.newest_intact_step() == (5, {})  # every step was sealed with its checksums
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]
  _assert_trees_equal(state, _random_tree(seeds[3]))
  assert meta == {"step": 4}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_meta() == {"step": 5}  # the no-op save left step 5 alone


def test_unfinished_step_directory_is_ignored(tmp_path: Path):
  seed = random.randrange(2**31)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _random_tree(seed), {"step": 1})
  debris = tmp_path / "2.orbax-checkpoint-tmp"  # how orbax names a step it has not finalised
  (debris / "state").mkdir(parents=True)
  (debris / "state" / "manifest.ocdbt").write_bytes(b"half written")

  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    state, _ = ckpt.restore(None, _abstract(_random_tree(0)))
    assert ckpt.save(2, _random_tree(seed + 1), {"step": 2})
    assert ckpt.latest_step() == 2
  _assert_trees_equal(state, _random_tree(seed))
  assert not debris.exists()


def test_kill_during_async_save_keeps_previous_checkpoint(tmp_path: Path):
  seed = random.randrange(2**31)
  writer = subprocess.Popen(
    [sys.executable, __file__, "crash_writer", "1", str(tmp_path), str(seed)],
    env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    line = writer.stdout.readline()
    assert line.strip() == "saving", writer.stderr.read()[-3000:]
    time.sleep(random.uniform(0, 0.3))  # the 256 MB write takes about a second
  finally:
    writer.send_signal(signal.SIGKILL)
    writer.wait()
  killed_mid_save = not (tmp_path / "2").exists()

  # This test process is the "new process" that resumes.
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == (1 if killed_mid_save else 2)
    assert ckpt.newest_intact_step() == (ckpt.latest_step(), {})  # a listed step is sealed
    state, meta = ckpt.restore(1, _abstract(_random_tree(0)))
    _assert_trees_equal(state, _random_tree(seed))
    assert meta == {"step": 1}
    assert ckpt.save(3, _random_tree(seed + 3), {"step": 3})
    assert ckpt.latest_step() == 3
    state, _ = ckpt.restore(3, _abstract(_random_tree(0)))
  _assert_trees_equal(state, _random_tree(seed + 3))
  assert not list(tmp_path.glob("*.orbax-checkpoint-tmp*"))


def _crash_writer(directory: str, seed: str) -> None:
  ckpt = Checkpointer(directory)
  ckpt.save(1, _random_tree(int(seed)), {"step": 1})
  ckpt.wait()
  ckpt.save(2, _big_tree(int(seed)), {"step": 2})  # async: returns before the write
  print("saving", flush=True)
  ckpt.wait()


def test_restore_onto_fewer_devices(tmp_path: Path):
  seed = str(random.randrange(2**31))
  _run_script("save_sharded", "8", str(tmp_path / "ckpt"), str(tmp_path / "saved.npz"), seed)
  out = _run_script("restore_sharded", "2", str(tmp_path / "ckpt"), str(tmp_path / "saved.npz"))
  assert out.stdout.strip() == "restored on 2 devices"


def _save_sharded(directory: str, npz_path: str, seed: str) -> None:
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  rng = np.random.default_rng(int(seed))
  x_NxD = jax.device_put(rng.standard_normal((16, 8), dtype=np.float32), NamedSharding(mesh, P("data", "model")))
  ids_N = jax.device_put(rng.integers(0, 1000, (16,), dtype=np.int32), NamedSharding(mesh, P(("data", "model"))))
  assert len(x_NxD.sharding.device_set) == len(ids_N.sharding.device_set) == 8
  with Checkpointer(directory) as ckpt:
    ckpt.save(5, {"x_NxD": x_NxD, "ids_N": ids_N}, {"devices": 8})
  np.savez(npz_path, x_NxD=np.asarray(x_NxD), ids_N=np.asarray(ids_N))


def _restore_sharded(directory: str, npz_path: str) -> None:
  mesh = jax.make_mesh((2,), ("fsdp",))
  target = {
    "x_NxD": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp"))),
    "ids_N": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=NamedSharding(mesh, P())),
  }
  state, meta = Checkpointer(directory).restore(None, target)
  saved = np.load(npz_path)
  for name, want in target.items():
    assert state[name].sharding == want.sharding, (name, state[name].sharding)
    np.testing.assert_array_equal(np.asarray(state[name]), saved[name])
  assert meta == {"devices": 8}
  print(f"restored on {len(jax.devices())} devices")


def test_mismatched_target_is_a_readable_error(tmp_path: Path):
  target = _abstract(_random_tree(0))
  target["w_DxF"] = jax.ShapeDtypeStruct((4, 16), jnp.float32)  # e.g. another d_ff
  target["router_D"] = jax.ShapeDtypeStruct((4,), jnp.float32)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _random_tree(random.randrange(2**31)), {})
    with pytest.raises(CheckpointError) as err:
      ckpt.restore(1, target)
  message = str(err.value)
  assert f"checkpoint {tmp_path / '1'} does not match the current model/config" in message
  assert "w_DxF: checkpoint shape (4, 8), target shape (4, 16)" in message
  assert "router_D: not in checkpoint" in message
  assert len(message) < 500


def test_missing_checkpoint_and_bad_meta_are_clear_errors(tmp_path: Path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
      ckpt.restore(None, {})
    with pytest.raises(CheckpointError, match="no checkpoint in"):
      ckpt.restore_meta()
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
      ckpt.save(1, _random_tree(0), {"key": jax.random.key(0)})
    ckpt.save(1, _random_tree(0), {})
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 2 .*have \[1\]"):
      ckpt.restore_meta(2)


def test_unwritable_directory_is_a_clear_error(tmp_path: Path):
  (tmp_path / "afile").write_text("not a directory")
  path = tmp_path / "afile" / "ckpt"
  with pytest.raises(CheckpointError, match=f"cannot create or write checkpoint directory {path}"):
    Checkpointer(path)


# ----------------------------------------------------------------------------- damage


def _fresh_tree(rng: np.random.Generator) -> dict:
  """Like _random_tree, with a 16 KB array, so that the largest file holds array bytes."""
  return {"x_N": jnp.asarray(rng.standard_normal(4096, dtype=np.float32)),
          "w_DxF": jnp.asarray(rng.standard_normal((4, 8), dtype=np.float32)),
          "layers": [jnp.asarray(rng.integers(0, 99, (5,), dtype=np.int32)), (jnp.bfloat16(rng.random()),)]}


def _files(root: Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _flip(path: Path, rng: np.random.Generator, n: int = 64, middle: bool = False) -> None:
  """XORs up to n consecutive bytes (at a random place, or the middle) with non-zero bytes."""
  data = np.frombuffer(path.read_bytes(), np.uint8).copy()
  n = min(n, data.size)
  start = (data.size - n) // 2 if middle else int(rng.integers(0, data.size - n + 1))
  data[start : start + n] ^= rng.integers(1, 256, n, dtype=np.uint8)
  path.write_bytes(data.tobytes())


def _damage(step_dir: Path, kind: str, rng: np.random.Generator) -> str:
  """Damages one file of a checkpoint step as storage would; its path relative to step_dir."""
  covered = [n for n in _files(step_dir) if n not in ("_CHECKPOINT_METADATA", "commit_success.txt")]
  if kind == "truncate":
    name = str(rng.choice([n for n in covered if (step_dir / n).stat().st_size > 0]))
    path = step_dir / name
    with open(path, "r+b") as f:
      f.truncate(int(rng.integers(0, path.stat().st_size)))
  elif kind == "delete":
    name = str(rng.choice(covered))
    (step_dir / name).unlink()
  elif kind == "flip_array_bytes":  # the middle of the largest file: array data
    name = max(covered, key=lambda n: (step_dir / n).stat().st_size)
    assert name.startswith("state/") and (step_dir / name).stat().st_size > 8192  # compressed
    _flip(step_dir / name, rng, middle=True)
  else:
    name = {"flip_sharding": "state/_sharding", "flip_tree_metadata": "state/_METADATA",
            "flip_ocdbt_index": "state/manifest.ocdbt", "flip_meta_json": "meta/metadata",
            "flip_manifest": "integrity.json"}[kind]
    _flip(step_dir / name, rng)
  return name


DAMAGE_KINDS = ["flip_array_bytes", "flip_sharding", "flip_tree_metadata", "flip_ocdbt_index",
                "flip_meta_json", "flip_manifest", "truncate", "delete"]


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damaged_newest_step_is_moved_aside_and_resume_falls_back(tmp_path: Path, rng, kind: str):
  trees = {step: _fresh_tree(rng) for step in (1, 2, 3)}
  with Checkpointer(tmp_path) as ckpt:
    for step, tree in trees.items():
      ckpt.save(step, tree, {"step": step})
  damaged = _damage(tmp_path / "3", kind, rng)
  as_damaged = _files(tmp_path / "3")

  logged = []
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointDamaged) as err:  # e.g. orbax would return changed values
      ckpt.restore(3, _abstract(trees[3]))
    assert f"checkpoint {tmp_path / '3'} is damaged: {damaged}" in str(err.value)
    assert ckpt.resume_step(logged.append) == 2
    assert ckpt.all_steps() == [1, 2]
    state, meta = ckpt.restore(None, _abstract(trees[2]))
    _assert_trees_equal(state, trees[2])
    assert meta == {"step": 2}
    assert ckpt.save(3, trees[3], {"step": 3})  # the resumed run writes step 3 again
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.newest_intact_step() == (3, {})
    state, _ = ckpt.restore(None, _abstract(trees[3]))
  _assert_trees_equal(state, trees[3])
  [aside] = tmp_path.glob("3.damaged-*")
  assert _files(aside) == as_damaged  # moved aside as it was, nothing deleted
  [line] = logged
  assert f"checkpoint {tmp_path / '3'} is damaged: {damaged}" in line and str(aside) in line


def test_no_intact_checkpoint_stops_and_touches_nothing(tmp_path: Path, rng):
  with Checkpointer(tmp_path) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _fresh_tree(rng), {"step": step})
  damaged = {step: _damage(tmp_path / str(step), kind, rng)
             for step, kind in ((1, "truncate"), (2, str(rng.choice(DAMAGE_KINDS))))}
  before = _files(tmp_path)
  logged = []
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointDamaged) as err:
      ckpt.resume_step(logged.append)
    assert ckpt.all_steps() == [1, 2]
  message = str(err.value)
  assert f"no intact checkpoint in {tmp_path}; nothing was moved or deleted" in message
  for step, name in damaged.items():
    assert f"{tmp_path / str(step)}: {name}" in message
  assert logged == [] and _files(tmp_path) == before


def test_verify_command_lists_each_checkpoint(tmp_path: Path, rng, capsys):
  workdir = tmp_path / "run"
  with Checkpointer(workdir / "checkpoints") as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _fresh_tree(rng), {"step": step})

  def verify() -> tuple[int, str]:
    code = checkpoint.main(["verify", str(workdir)])
    return code, capsys.readouterr().out

  code, out = verify()
  assert code == 0 and all(f"step {s}: intact" in out for s in (1, 2, 3)), out
  older = _damage(workdir / "checkpoints" / "1", str(rng.choice(DAMAGE_KINDS)), rng)
  code, out = verify()
  assert code == 0 and f"step 1: DAMAGED: {older}" in out, out  # the newest is what resumes
  newest = _damage(workdir / "checkpoints" / "3", str(rng.choice(DAMAGE_KINDS)), rng)
  code, out = verify()
  assert code == 1 and f"step 3: DAMAGED: {newest}" in out and "step 2: intact" in out, out
  assert "starts from step 2" in out
  with Checkpointer(workdir / "checkpoints") as ckpt:
    assert ckpt.resume_step(lambda line: None) == 2
  code, out = verify()
  assert code == 0 and "3.damaged-" in out and "moved aside" in out, out
  _damage(workdir / "checkpoints" / "2", "truncate", rng)
  _damage(workdir / "checkpoints" / "1", "delete", rng)  # none intact now
  code, out = verify()
  assert code == 1 and "no checkpoint is intact: resuming stops and touches nothing" in out, out
  assert checkpoint.main(["verify", str(tmp_path / "nothing")]) == 2


if __name__ == "__main__":  # subprocess entry: MODE NUM_CPU_DEVICES ARGS...
  mode, num_devices, *args = sys.argv[1:]
  jax.config.update("jax_num_cpu_devices", int(num_devices))
  {"crash_writer": _crash_writer, "save_sharded": _save_sharded, "restore_sharded": _restore_sharded}[mode](*args)
