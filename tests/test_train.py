"""train.py end to end: kill-and-resume is bitwise exact, damaged checkpoints are moved
aside, device-count changes, export, divergence, and bad input. Runs train.py in
subprocesses as a user would."""

import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import pytest
from flax import nnx

from mohge_jax import export
from mohge_jax.checkpoint import Checkpointer
from mohge_jax.config import load_config
from mohge_jax.model import Transformer
from mohge_jax.trainer import abstract_state, make_init_fn
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["model.d_model=32", "model.num_heads=2", "model.kv_lora_rank=16",
         "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8",
         "model.dense_ffn_width=48", "model.group_widths=[8,16,24]",
         "model.experts_per_group=2", "model.top_k_groups=2", "model.top_k=3",
         "model.shared_expert_width=8", "model.num_layers=2", "train.batch_size=8",
         "train.seq_len=32", "train.warmup_steps=2", "train.log_every=2", "train.eval_every=6",
         "train.eval_batches=1"]


# Runs of the same program share XLA's persistent compilation cache: only the first
# compiles (the suite's time is mostly compilation). One cache per test process.
XLA_CACHE = tempfile.mkdtemp(prefix="mohge_test_xla_cache_")
atexit.register(shutil.rmtree, XLA_CACHE, True)


def run_train(workdir, steps, extra=(), devices=1, cache=None, wait=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices),
             JAX_COMPILATION_CACHE_DIR=XLA_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
         "--workdir", str(workdir), "--steps", str(steps), *MICRO,
         f"data.cache_dir={cache or Path(workdir).parent / 'cache'}", *extra]
  if not wait:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def final_params(workdir):
  cfg = load_config(Path(workdir) / "config.yaml")
  ckpt = Checkpointer(Path(workdir) / "checkpoints", async_save=False)
  state, meta = ckpt.restore(None, abstract_state(cfg))
  ckpt.close()
  return state, meta


def last_logged_step(workdir) -> int:
  """The step of the last complete line of metrics.jsonl (0 if none)."""
  path = Path(workdir) / "metrics.jsonl"
  lines = [l for l in (path.read_text() if path.exists() else "").splitlines(True)
           if l.endswith("\n")]
  return json.loads(lines[-1])["step"] if lines else 0


def complete_checkpoints(workdir) -> list[int]:
  """Steps of the finished checkpoints: orbax writes `<step>.orbax-checkpoint-tmp*` and
  renames it to `<step>` once complete; only the renamed ones count."""
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_sigterm_checkpoints_the_current_step_and_stops(tmp_path):
  work = tmp_path / "run"
  proc = run_train(work, 400, ["train.ckpt_every=1000"], wait=False)
  deadline = time.time() + 300
  while last_logged_step(work) < 2 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0].decode()
  assert proc.returncode == 0, out
  saved = complete_checkpoints(work)
  summary = json.loads((work / "summary.json").read_text())
  assert summary["stopped_by_signal"] and saved == [summary["step"]] and summary["step"] < 400
  assert f"received SIGTERM: saved step {summary['step']}" in out, out


STOP_SCRIPT = r"""
import os, signal, sys, threading, time
from mohge_jax.trainer import _StopFlag
grace, signals = float(sys.argv[1]), int(sys.argv[2])
with _StopFlag(grace, log=lambda m: print(m, flush=True)) as stop:
  for _ in range(signals):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
  if sys.argv[3] == "blocked":
    print("blocking", flush=True)
    lock = threading.Lock(); lock.acquire(); lock.acquire()  # never returns by itself
  print("flag", stop.signal == signal.SIGTERM, flush=True)
time.sleep(grace + 0.5)  # the deadline is cancelled on leaving the block
print("left normally", flush=True)
"""


@pytest.mark.parametrize("grace,signals,mode,code,says", [
    (1.0, 1, "blocked", 128 + signal.SIGTERM, "has not stopped"),  # a stuck step: deadline
    (60.0, 2, "blocked", 128 + signal.SIGTERM, "second signal"),  # second signal: at once
    (0.5, 1, "free", 0, "left normally")])  # stopped in time: no forced exit
def test_stop_flag_exits_a_run_that_cannot_stop(grace, signals, mode, code, says):
  """The run's main thread blocked (as in a device call stuck in a collective, where
  Python signal handlers never run): the watchdog still ends it."""
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-c", STOP_SCRIPT, str(grace), str(signals), mode],
                        cwd=ROOT, capture_output=True, text=True, timeout=30)
  assert proc.returncode == code and says in proc.stdout, (proc.returncode, proc.stdout,
                                                           proc.stderr)
  assert time.time() - t0 < 20
  if mode == "free":
    assert "flag True" in proc.stdout


def test_sigkill_and_rerun_equals_uninterrupted_run_bitwise(tmp_path, rng):
  steps = 24
  clean = run_train(tmp_path / "clean", steps, ["train.ckpt_every=4"])
  assert clean.returncode == 0, clean.stdout + clean.stderr

  work = tmp_path / "killed"
  proc = run_train(work, steps, ["train.ckpt_every=4"], wait=False)
  # Killed just after a random logged step from 4 to 16 (logs every 2, saves every 4: often
  # during a save) once a checkpoint is complete, with steps left however fast the machine
  # (a fixed delay was not).
  target, deadline = 2 * int(rng.integers(2, (steps - 8) // 2 + 1)), time.time() + 300
  while ((last_logged_step(work) < target or not complete_checkpoints(work))
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.01)
  time.sleep(float(rng.uniform(0, 0.05)))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = complete_checkpoints(work)
  assert saved, "no checkpoint was complete when the run was killed: nothing to resume"
  killed_at = last_logged_step(work)
  assert killed_at < steps and max(saved) < steps, (
      "the run finished before it was killed: test proves nothing")

  resumed = run_train(work, steps, ["train.ckpt_every=4"])
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  # The second run restored the last complete checkpoint of the killed one (it did not
  # start afresh, which would also end bitwise equal) and trained the remaining steps.
  assert "initialised" not in resumed.stdout, resumed.stdout
  found = re.search(r"resumed from step (\d+)", resumed.stdout)
  assert found and int(found.group(1)) == max(saved), (saved, resumed.stdout)

  a, _ = final_params(tmp_path / "clean")
  b, _ = final_params(work)
  assert int(a["step"]) == int(b["step"]) == steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  sa = json.loads((tmp_path / "clean" / "summary.json").read_text())
  sb = json.loads((work / "summary.json").read_text())
  assert sa["loss"] == sb["loss"]
  # The metrics file has each step once, in order, after the resume.
  logged = [json.loads(l)["step"] for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert logged == sorted(set(logged)) and logged[-1] == steps


def flip_bytes(path, rng, n=64, middle=False):
  """XORs n consecutive bytes of a file (at a random place, or the middle) with non-zero ones."""
  data = np.frombuffer(path.read_bytes(), np.uint8).copy()
  n = min(n, data.size)
  start = (data.size - n) // 2 if middle else int(rng.integers(0, data.size - n + 1))
  data[start:start + n] ^= rng.integers(1, 256, n, dtype=np.uint8)
  path.write_bytes(data.tobytes())


def test_damaged_checkpoints_are_moved_aside_and_rerun_ends_bit_identical(tmp_path, rng):
  """The damage users met (array bytes, the meta JSON, the sharding file): the same command
  again reports each checkpoint with its file, moves it aside, resumes from the newest intact
  one and, the data order being a function of the step, ends where the undamaged run ended."""
  work, ckpts = tmp_path / "w", tmp_path / "w" / "checkpoints"
  args = (12, ["train.ckpt_every=4"])
  first = run_train(work, *args)
  assert first.returncode == 0, first.stdout + first.stderr
  want, _ = final_params(work)
  want_loss = json.loads((work / "summary.json").read_text())["loss"]

  def rerun_ends_as_before(resumed_from):
    out = run_train(work, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed from step {resumed_from}" in out.stdout, out.stdout
    got, _ = final_params(work)
    assert int(got["step"]) == 12
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert json.loads((work / "summary.json").read_text())["loss"] == want_loss
    return out.stdout

  largest = max((p for p in (ckpts / "12" / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  flip_bytes(largest, rng, middle=True)
  verify = subprocess.run([sys.executable, "-m", "mohge_jax.checkpoint", "verify", str(work)],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert verify.returncode == 1, verify.stdout + verify.stderr
  assert "step 8: intact" in verify.stdout and "step 12: DAMAGED: state/" in verify.stdout
  out = rerun_ends_as_before(resumed_from=8)
  assert f"checkpoint {ckpts / '12'} is damaged: {largest.relative_to(ckpts / '12')}" in out

  flip_bytes(ckpts / "12" / "meta" / "metadata", rng)
  flip_bytes(ckpts / "8" / "state" / "_sharding", rng)
  out = rerun_ends_as_before(resumed_from=4)
  assert f"checkpoint {ckpts / '12'} is damaged: meta/metadata" in out
  assert f"checkpoint {ckpts / '8'} is damaged: state/_sharding" in out
  assert len(list(ckpts.glob("12.damaged-*"))) == 2 and len(list(ckpts.glob("8.damaged-*"))) == 1


def test_divergence_message_trusts_only_verified_checkpoints(tmp_path, rng):
  from mohge_jax.trainer import _divergence_message
  host = {"loss": float("nan"), "grad_norm": float("inf")}
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    for step in (2, 4):
      ckpt.save(step, {"w": jnp.asarray(rng.standard_normal(256, dtype=np.float32))}, {})
    message = _divergence_message(ckpt, 5, host, resumed_from=2)
    assert "loss is nan (grad norm inf) at step 5: training diverged." in message
    assert f"last good (verified) checkpoint is step 4 in {tmp_path}" in message
    assert "lower train.lr" in message
    flip_bytes(tmp_path / "4" / "state" / "_sharding", rng)  # damaged since it was written
    assert "last good (verified) checkpoint is step 2 in" in _divergence_message(
        ckpt, 5, host, resumed_from=2)
    flip_bytes(tmp_path / "2" / "meta" / "metadata", rng)  # the step the run started from
    message = _divergence_message(ckpt, 5, host, resumed_from=2)
    assert f"after resuming from {tmp_path / '2'}, which fails verification now" in message
    assert "meta/metadata" in message and "last good (verified) checkpoint is none" in message
    assert "lower train.lr" not in message


def test_restore_on_another_device_count(tmp_path):
  """A checkpoint written on 4 devices resumes on 2 and on 1 to the same state: the first
  loss after the resume (a forward pass of the restored parameters) agrees to rounding."""
  first = run_train(tmp_path / "four", 3, ["train.ckpt_every=3"], devices=4)
  assert first.returncode == 0, first.stdout + first.stderr
  shutil.copytree(tmp_path / "four", tmp_path / "copy")
  losses = {}
  for name, devices in (("four", 2), ("copy", 1)):
    out = run_train(tmp_path / name, 4, ["train.ckpt_every=3", "train.log_every=1"],
                    devices=devices)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from step 3" in out.stdout
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses[name] = [r["loss"] for r in rows if r["step"] == 4][0]
  assert abs(losses["four"] - losses["copy"]) < 1e-5 * losses["copy"], losses


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
  out = run_train(tmp_path / "nan", 30, ["train.lr=1e4", "train.warmup_steps=0",
                                         "train.ckpt_every=1", "train.log_every=1",
                                         "train.min_lr=0"])
  assert out.returncode == 2, out.stdout + out.stderr
  assert "training diverged" in out.stderr
  assert "The last good (verified) checkpoint is step" in out.stderr
  assert "lower train.lr" in out.stderr  # the run started afresh: the lr is to blame
  state, meta = final_params(tmp_path / "nan")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
  assert int(state["step"]) < 30


def test_export_round_trip(tmp_path, rng):
  cfg = load_config("configs/tiny.yaml", MICRO + ["model.num_layers=4"])  # a stack of 3
  params = jax.jit(make_init_fn(cfg))()["params"]
  model = nnx.merge(nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[0], params)
  tokens = jnp.asarray(rng.integers(0, 257, size=(2, 16)))
  want, _ = model(tokens)
  export.export_params(params, cfg, tmp_path / "f32", dtype="f32")
  # One tensor per layer, named by the layer, whatever stacks the model scans.
  tensors = safetensors.numpy.load_file(str(tmp_path / "f32" / "model.safetensors"))
  kinds = cfg.model.ffn_kinds
  for i in range(cfg.model.num_layers):
    stack = 0 if i < kinds.count("dense") else 1
    first = 0 if stack == 0 else kinds.count("dense")
    np.testing.assert_array_equal(tensors[f"blocks.{i}.attn.w_o"],
                                  np.asarray(params["stacks"][stack]["layers"]["attn"]["w_o"][i - first]))
  assert not any(k.startswith("stacks") for k in tensors)
  loaded, cfg2 = export.load(tmp_path / "f32")
  assert cfg2 == cfg
  np.testing.assert_array_equal(np.asarray(loaded(tokens)[0]), np.asarray(want))
  # bf16: the same as the model with its parameters rounded to bf16.
  export.export_params(params, cfg, tmp_path / "bf16", dtype="bf16")
  loaded16, _ = export.load(tmp_path / "bf16")
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  model16 = nnx.merge(nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[0], rounded)
  np.testing.assert_array_equal(np.asarray(loaded16(tokens)[0]), np.asarray(model16(tokens)[0]))
  assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < (
      tmp_path / "f32" / "model.safetensors").stat().st_size * 0.6


def test_export_load_refuses_a_damaged_file(tmp_path, rng):
  cfg = load_config("configs/tiny.yaml", MICRO)
  shapes = jax.eval_shape(make_init_fn(cfg))["params"]
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
  out = export.export_params(params, cfg, tmp_path / "m", dtype="f32")
  tensors, config = out / "model.safetensors", json.loads((out / "config.json").read_text())
  assert config["checksums"] == {"model.safetensors": {
      "bytes": tensors.stat().st_size, "sha256": hashlib.sha256(tensors.read_bytes()).hexdigest()}}
  model, cfg2 = export.load(out)
  assert cfg2 == cfg
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(model)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  written = tensors.read_bytes()
  flip_bytes(tensors, rng)
  with pytest.raises(ValueError, match=f"{tensors} is damaged: .*sha256 mismatch"):
    export.load(out)
  tensors.write_bytes(written[:int(rng.integers(0, len(written)))])
  with pytest.raises(ValueError, match=f"{tensors} is damaged: .*bytes, {len(written):,} written"):
    export.load(out)
  tensors.write_bytes(written)
  del config["checksums"]
  (out / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="config.json has no checksums"):
    export.load(out)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A 2-step run with its checkpoint at step 2 (train.py's output and the workdir): the
  tests below copy the workdir before they write into it."""
  work = tmp_path_factory.mktemp("two_steps") / "w"
  out = run_train(work, 2, ["train.ckpt_every=2"])
  assert out.returncode == 0, out.stdout + out.stderr
  return out, work


# One worker runs both users of the fixture (under -n 2 each worker would train its own).
@pytest.mark.xdist_group("two_steps")
def test_export_cli_from_a_training_workdir(tmp_path, two_steps):
  shutil.copytree(two_steps[1], tmp_path / "w")
  cli = subprocess.run([sys.executable, "-m", "mohge_jax.export", str(tmp_path / "w"),
                        str(tmp_path / "exp"), "--dtype", "f32"], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert cli.returncode == 0, cli.stderr
  state, _ = final_params(tmp_path / "w")
  model, _ = export.load(tmp_path / "exp")
  for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  plot = subprocess.run([sys.executable, "-m", "mohge_jax.plot", str(tmp_path / "w")],
                        capture_output=True, text=True, cwd=ROOT)
  assert plot.returncode == 0, plot.stderr
  assert (tmp_path / "w" / "plots.png").stat().st_size > 10_000
  bad = subprocess.run([sys.executable, "-m", "mohge_jax.export", str(tmp_path / "none"),
                        str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT)
  assert bad.returncode == 2 and "no checkpoints" in bad.stderr


@pytest.mark.xdist_group("two_steps")
def test_incompatible_checkpoint_is_refused(tmp_path, two_steps):
  out = two_steps[0]
  shutil.copytree(two_steps[1], tmp_path / "w")
  # The start-up is timed: printed, in the first metrics row and in the summary.
  assert re.search(r"first step after [\d.]+ s \(lower [\d.]+ s, compile [\d.]+ s", out.stdout)
  first = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
  summary = json.loads((tmp_path / "w" / "summary.json").read_text())
  for key in ("init_s", "lower_s", "compile_s", "first_step_s", "time_to_first_step_s"):
    assert first[key] > 0 and summary[key] == first[key], key
  assert summary["time_to_first_step_s"] == pytest.approx(
      summary["lower_s"] + summary["compile_s"] + summary["first_step_s"])
  again = run_train(tmp_path / "w", 4, ["model.top_k=2"])
  assert again.returncode == 2
  assert "different config: top_k (checkpoint 3, now 2)" in again.stderr
  assert "Traceback" not in again.stderr
  # Fields that change how the step runs, not the parameters, may change on resume.
  other = run_train(tmp_path / "w", 3, ["model.scan_layers=false", "model.remat=full"])
  assert other.returncode == 0, other.stdout + other.stderr
  assert "resumed from step 2" in other.stdout


@pytest.mark.parametrize("extra,message", [
    (["model.tok_k=1"], "unknown key(s) 'model.tok_k'"),
    (["data.source=/no/such/dir/*.txt"], "matches no files"),
    (["data.source=/no/such/file.txt"], "/no/such/file.txt"),
    (["data.tokenizer=/no/tokenizer.json"], "/no/tokenizer.json"),
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the tokenizer's"),
    (["train.seq_len=512"], "train.seq_len=512 exceeds model.max_seq_len"),
])
def test_bad_input_gets_a_clear_error(tmp_path, extra, message, capsys):
  import train
  code = train.main(["--config", str(ROOT / "configs/tiny.yaml"), "--workdir",
                     str(tmp_path / "w"), *MICRO, f"data.cache_dir={tmp_path / 'c'}", *extra])
  err = capsys.readouterr().err
  assert code == 2 and message in err, err


def test_unwritable_workdir(tmp_path, capsys):
  import train
  (tmp_path / "file").write_text("x")
  code = train.main(["--config", str(ROOT / "configs/tiny.yaml"), "--workdir",
                     str(tmp_path / "file" / "w"), *MICRO])
  assert code == 2 and "is not writable" in capsys.readouterr().err


def test_help_documents_everything():
  out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True,
                       text=True)
  assert out.returncode == 0
  for word in ("--config", "--workdir", "--steps", "key=value", "resume", "SIGTERM", "export"):
    assert word in out.stdout


def assert_same_step(before, got, want, *, lr_tol=1e-2):
  """`got` and `want` ((state, metrics) after one step from the same `before` state) moved
  the parameters and agree: Adam's first moments (0.1 x the clipped gradient) to float
  rounding, the parameters to a fraction of the step's learning rate (Adam's first update
  is about lr * sign(g), so parameters compare in units of lr, not to a relative tol)."""
  lr0 = float(want[1]["lr"])
  assert lr0 > 0, "the first step has a zero learning rate: nothing moves"
  p0, pa, pb = (jax.tree.leaves(x) for x in (before, got[0]["params"], want[0]["params"]))
  moved = np.concatenate([np.abs(np.asarray(b) - np.asarray(a)).ravel()
                          for a, b in zip(p0, pb)])
  assert np.mean(moved > 0.5 * lr0) > 0.5, "the step left most parameters where they were"
  mu_a, mu_b = (jax.tree.leaves(s[0]["opt_state"][1][0].mu) for s in (got, want))
  for a, b in zip(mu_a, mu_b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(np.asarray(b)))) + 1e-12)
  for a, b, ma, mb in zip(pa, pb, mu_a, mu_b):
    # Adam's first update lr * g / (|g| + eps) turns a gradient difference dg into up to
    # lr * eps * dg / (|g| + eps)^2: large where |g| is near eps (optax's 1e-8), so such
    # elements get that much more room (g = mu / (1 - b1), b1 = 0.9).
    g, dg = (np.abs(np.asarray(m, np.float64)) / 0.1 for m in (mb, np.asarray(ma) - np.asarray(mb)))
    eps = 1e-8
    tol = lr_tol * lr0 + 2 * lr0 * eps * dg / (g + eps) ** 2
    assert np.all(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) <= tol), (
        f"parameters differ beyond {lr_tol} lr (and Adam's eps sensitivity)")


def batch_of(tokens_BxW, mask_BxL, accum=1):
  """A training batch [accum, B/accum, L] of windows (positions 0..L-1, one segment)."""
  B, L = mask_BxL.shape
  full = {"inputs": tokens_BxW[:, :-1], "targets": tokens_BxW[:, 1:],
          "loss_mask": mask_BxL.astype(np.float32), "segment_ids": np.zeros((B, L), np.int32),
          "positions": np.broadcast_to(np.arange(L), (B, L)).astype(np.int32)}
  return {k: v.reshape(accum, B // accum, *v.shape[1:]) for k, v in full.items()}


def test_init_seed_as_argument_gives_the_same_state_and_one_program(rng):
  """The trainer passes train.seed as an argument: the same parameters as the seed baked
  in, and one compiled program for every seed."""
  seed = int(rng.integers(1000))
  cfg = load_config("configs/tiny.yaml", MICRO + [f"train.seed={seed}"])
  init = jax.jit(make_init_fn(cfg))
  baked, passed = init(), init(jnp.int32(seed))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               baked, passed)
  other = jax.jit(make_init_fn(load_config("configs/tiny.yaml", MICRO + ["train.seed=0"])))
  assert (other.lower(jnp.int32(seed)).as_text() == init.lower(jnp.int32(0)).as_text())
  assert not np.array_equal(np.asarray(init(jnp.int32(seed + 1))["rng"]),
                            np.asarray(passed["rng"]))


def test_chunked_logits_step_equals_plain_step(rng):
  from mohge_jax.trainer import graph_def, make_train_step
  batch = batch_of(rng.integers(0, 257, size=(8, 33)), rng.random((8, 32)) > 0.1)
  out = {}
  for chunk in (0, 12):
    cfg = load_config("configs/tiny.yaml", MICRO + [f"train.logits_chunk={chunk}"])
    state = jax.jit(make_init_fn(cfg))()
    before = jax.tree.map(np.asarray, state["params"])
    out[chunk] = make_train_step(cfg, graph_def(cfg))(state, batch)
  np.testing.assert_allclose(float(out[12][1]["lm_loss"]), float(out[0][1]["lm_loss"]), rtol=1e-5)
  assert_same_step(before, out[12], out[0])


def test_gradient_accumulation_equals_one_big_batch(rng):
  """Micro-batches with very different numbers of scored tokens (the first rows mostly
  masked) give the step of one batch of 8: the LM loss is weighted by tokens. The aux
  losses are per micro-batch; with loss.aux_tokens dividing every micro-batch (2 rows)
  their statistics are the same chunks whatever grad_accum, so they agree too."""
  from mohge_jax.trainer import graph_def, make_train_step
  tokens = rng.integers(0, 257, size=(8, 33))
  mask = rng.random((8, 32)) > 0.1
  mask[:4] &= rng.random((4, 32)) < 0.15
  accum = int(rng.choice([2, 4]))
  out = {}
  for a in (1, accum):
    cfg = load_config("configs/tiny.yaml", MICRO + [
        f"train.grad_accum={a}", "loss.aux_tokens=64", "loss.group_aux_start_step=0"])
    state = jax.jit(make_init_fn(cfg))()
    before = jax.tree.map(np.asarray, state["params"])
    out[a] = make_train_step(cfg, graph_def(cfg))(state, batch_of(tokens, mask, a))
  for k in ("loss", "lm_loss", "group_aux", "expert_aux", "grad_norm"):
    np.testing.assert_allclose(float(out[accum][1][k]), float(out[1][1][k]), rtol=1e-5,
                               err_msg=f"{k}, grad_accum={accum}")
  assert_same_step(before, out[accum], out[1])


def test_forced_routes_in_the_batch_are_replayed(rng):
  """A batch with forced_expert_ids / forced_group_ids (benchmarks.train_step
  --routing uniform) trains on those routes in every routed layer, also through gradient
  accumulation: the step's expert token counts are the forced ids' counts, and the router
  still gets a gradient (the combine weights stay live)."""
  from benchmarks.train_step import uniform_routes
  from mohge_jax.trainer import graph_def, make_train_step
  cfg = load_config("configs/tiny.yaml", MICRO + ["train.grad_accum=2"])
  m = cfg.model
  batch = batch_of(rng.integers(0, 257, size=(8, 33)), np.ones((8, 32), bool), 2)
  e, g = uniform_routes(cfg, (2, 4, 32), rng)
  R = sum(k != "dense" for k in m.ffn_kinds)
  assert e.shape == (2, 4, 32, R, m.top_k) and g.shape == (2, 4, 32, R, m.top_k_groups)
  state = jax.jit(make_init_fn(cfg))()
  router_before = [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
      state["params"]) if "router" in jax.tree_util.keystr(k)]
  new, metrics = make_train_step(cfg, graph_def(cfg))(
      state, dict(batch, forced_expert_ids=e, forced_group_ids=g))
  want = np.stack([np.bincount(e[..., r, :].ravel(), minlength=m.num_experts)
                   for r in range(R)])
  np.testing.assert_array_equal(np.asarray(metrics["expert_tokens"]), want)
  router_after = [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
      new["params"]) if "router" in jax.tree_util.keystr(k)]
  assert router_before and all(np.abs(a - b).max() > 0
                               for a, b in zip(router_after, router_before))


@pytest.mark.parametrize("config", ["configs/mohge_3b.yaml", "configs/moe_3b.yaml"])
def test_uniform_routes_are_valid_and_balanced(rng, config):
  """uniform_routes: distinct groups, distinct experts all inside the chosen groups, and
  every expert (so every expert-parallel rank) as often as any other, within sampling
  noise (5 sigma of the binomial count)."""
  from benchmarks.train_step import uniform_routes
  m = load_config(config).model
  e, g = uniform_routes(load_config(config), (4000,), rng)
  e, g = e.reshape(-1, m.top_k), g.reshape(-1, m.top_k_groups)
  N = m.experts_per_group
  assert all(len(set(r)) == m.top_k for r in e[:500])
  assert all(len(set(r)) == m.top_k_groups for r in g[:500])
  assert np.all(np.any(e[:, :, None] // N == g[:, None, :], axis=-1))  # in chosen groups
  counts = np.bincount(e.ravel(), minlength=m.num_experts)
  n, p = e.shape[0], m.top_k / m.num_experts
  assert np.abs(counts - n * p).max() < 5 * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("doc_mask", [False, True])
def test_training_batches_follow_doc_attention_mask(tmp_path, monkeypatch, rng, doc_mask):
  """Positions restart after separators only where attention is masked per document
  (model.doc_attention_mask=true); otherwise (the reference) they run 0..L-1 and every
  target is scored. Runs train() up to its first batch."""
  from mohge_jax import data, trainer
  for i in range(40):
    (tmp_path / f"{i:02d}.txt").write_text("".join(
        chr(c) for c in rng.integers(0x61, 0x7B, int(rng.integers(3, 30)))))
  cfg = load_config("configs/tiny.yaml", MICRO + [
      f"model.doc_attention_mask={str(doc_mask).lower()}", f"data.source={tmp_path}/*.txt",
      f"data.cache_dir={tmp_path / 'cache'}"])

  class FirstBatch(Exception):
    pass

  real = data.BatchIterator

  def first_batch(*args, **kwargs):
    raise FirstBatch(real(*args, **kwargs).batch_at(0))

  monkeypatch.setattr(data, "BatchIterator", first_batch)
  with pytest.raises(FirstBatch) as caught:
    trainer.train(cfg, tmp_path / "w", log=lambda *a, **k: None)
  batch = caught.value.args[0]
  inputs = batch["inputs"]
  B, L = inputs.shape
  eos = inputs == 256
  assert eos[:, :-1].any(), "no separator inside a window: the test proves nothing"
  if doc_mask:
    after_eos = np.zeros_like(eos)
    after_eos[:, 1:] = eos[:, :-1]
    t = np.arange(L)
    want_pos = t - np.maximum.accumulate(np.where(after_eos, t, 0), axis=1)
    np.testing.assert_array_equal(batch["positions"], want_pos)
    np.testing.assert_array_equal(batch["loss_mask"], ~eos)
    np.testing.assert_array_equal(batch["segment_ids"], np.cumsum(after_eos, axis=1))
  else:
    np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(L), (B, L)))
    assert batch["loss_mask"].all() and not batch["segment_ids"].any()


def test_main_sets_the_gpu_exchange_flags_before_training(tmp_path, monkeypatch):
  """train.py turns mesh.gpu_a2a into XLA_FLAGS before anything can start a backend (the
  training itself is replaced: only the order matters here)."""
  import train
  from mohge_jax import collectives, trainer
  seen = {}

  def fake_train(cfg, workdir):
    seen["flags"] = os.environ.get("XLA_FLAGS", "")
    return type("Result", (), {"step": cfg.train.steps, "stopped_by_signal": False})()

  monkeypatch.setattr(trainer, "train", fake_train)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  code = train.main(["--config", str(ROOT / "configs/tiny.yaml"), "--workdir",
                     str(tmp_path / "w"), "mesh.gpu_a2a=nccl"])
  assert code == 0
  assert seen["flags"].split() == ["--xla_dump_to=/tmp/x", *collectives.GPU_A2A_FLAGS["nccl"]]
