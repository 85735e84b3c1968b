"""Training: the jit-compiled step and the loop around it.

    state = {"params": nnx.State, "opt_state": optax state, "step": int32[], "rng": key data}
    step(state, batch) -> (state, metrics)       # one jit, buffers donated

The loop reads data, evaluates, checkpoints (every N steps, on SIGTERM/SIGINT, at the end),
logs, and resumes from the newest intact checkpoint of the workdir (damaged ones moved aside).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from mohge_jax import allocation, data, distributed, losses, routing, sharding
from mohge_jax.checkpoint import Checkpointer, CheckpointError
from mohge_jax.config import Config
from mohge_jax.metrics import MetricsLog, Progress, plain
from mohge_jax.model import Transformer, head_weight
from mohge_jax.optimizer import lr_schedule, make_optimizer


class TrainingError(RuntimeError):
  """The run cannot go on (bad input, divergence); the message says why and what to do."""


# Model fields that change how the step runs, not the parameters: a run may resume a
# checkpoint with other values.
RUNTIME_MODEL_FIELDS = ("scan_layers", "remat", "expert_backend", "attention_impl",
                        "dsa_impl")
# The parameter layout checkpoints hold (written to their meta): layers stacked per run of
# one FFN kind (model.Stack). Checkpoints without it hold one entry per layer.
PARAM_LAYOUT = "stacked_layers"


def use_compile_cache(directory: str) -> str | None:
  """Turns on XLA's persistent compilation cache in `directory` (unless the environment's
  JAX_COMPILATION_CACHE_DIR already chose one); returns the directory in use."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not directory:
    return None
  path = Path(directory).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  return str(path)


# ----------------------------------------------------------------------------- the step


def graph_def(cfg: Config) -> nnx.GraphDef:
  """The model's structure without its parameters (built abstractly)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  return graphdef


def make_init_fn(cfg: Config):
  """A pure function building the initial training state (jit it with out_shardings).

  init(seed=None): from train.seed, or from `seed` (an int32 array, the same values for
  the same number): passed as an argument, the seed is not a constant of the compiled
  program, so runs that differ only in their seed share one compilation (cache entry).
  """
  tx = optimizer_for(cfg)

  def init(seed=None):
    seed = cfg.train.seed if seed is None else seed
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(jax.random.key(seed))))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1))}
  return init


def dsa_warmup(cfg: Config) -> bool:
  """DSA's dense warm-up stage: only the indexer trains, on its KL loss alone."""
  return cfg.model.sparse_attention == "dsa" and cfg.train.dsa_stage == "dense_warmup"


def optimizer_for(cfg: Config) -> optax.GradientTransformation:
  return make_optimizer(cfg.train, only_indexer=dsa_warmup(cfg))


def abstract_state(cfg: Config, mesh: jax.sharding.Mesh | None = None):
  """The training state's shapes, dtypes and shardings on `mesh` (default: cfg.mesh over
  all devices): the restore target for checkpoints, whatever device count wrote them."""
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  shapes = jax.eval_shape(make_init_fn(cfg))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, sharding.state_shardings(shapes, mesh))


def make_loss_fn(cfg: Config, graphdef: nnx.GraphDef):
  """loss_fn(params, batch, group_aux_on, lm_tokens=None, aux_weight=1.0) -> (loss, metrics).

  The LM loss is the batch's summed token NLL divided by `lm_tokens` (default: the batch's
  own scored tokens, i.e. its mean); the auxiliary losses are weighted by `aux_weight`.
  Every metric is this batch's share of the value, so that shares of micro-batches add up.
  A batch with `forced_expert_ids` [B, L, R, K] and `forced_group_ids` [B, L, R, Kg] (R
  routed layers in model order) replays those routes (`routing.Forced`: the ids are
  forced, the combine weights stay the live router's): benchmarks use it to time a
  chosen routing, e.g. a balanced one.

  With DSA (model.sparse_attention=dsa) the indexer's KL (`dsa_kl`, summed over layers,
  times loss.dsa_kl_coef) is added; its gradient reaches only the indexer and the LM
  loss's never does (model's stop-gradients). In the dense warm-up the loss is the KL
  alone: the LM loss is still reported, and the optimizer freezes everything else.
  """
  warmup = dsa_warmup(cfg)

  def loss_fn(params, batch, group_aux_on, lm_tokens=None, aux_weight=1.0):
    model = nnx.merge(graphdef, params)
    forced = None
    if "forced_expert_ids" in batch:  # [B, L, R, K] -> [R, B, L, K]: replayed routes
      forced = routing.Forced(jnp.moveaxis(batch["forced_expert_ids"], 2, 0),
                              jnp.moveaxis(batch["forced_group_ids"], 2, 0))
    if cfg.train.logits_chunk:
      h, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                     return_hidden=True, forced=forced)
      lm_loss, _ = losses.chunked_cross_entropy(h, head_weight(model), batch["targets"],
                                                batch["loss_mask"], chunk=cfg.train.logits_chunk,
                                                normalizer=lm_tokens)
    else:
      logits, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                          forced=forced)
      lm_loss, _ = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"],
                                        normalizer=lm_tokens)
    group_aux_raw = aux["group_aux"] * aux_weight
    expert_aux, z_loss = aux["expert_aux"] * aux_weight, aux["z_loss"] * aux_weight
    group_aux = group_aux_raw * group_aux_on  # switched on at loss.group_aux_start_step
    total = lm_loss + group_aux + expert_aux + z_loss
    metrics = {"loss": total, "lm_loss": lm_loss, "group_aux": group_aux,
               "group_aux_raw": group_aux_raw, "expert_aux": expert_aux, "z_loss": z_loss}
    if cfg.model.sparse_attention == "dsa":
      dsa_kl = aux["dsa_kl"] * (cfg.loss.dsa_kl_coef * aux_weight)
      total = dsa_kl if warmup else total + dsa_kl
      metrics.update(loss=total, dsa_kl=dsa_kl)
    if "group_tokens" in aux:
      metrics["group_tokens"] = aux["group_tokens"]
      metrics["expert_tokens"] = aux["expert_tokens"]
    return total, metrics
  return loss_fn


def make_train_step(cfg: Config, graphdef: nnx.GraphDef):
  tx = optimizer_for(cfg)
  schedule = lr_schedule(cfg.train)
  grad_fn = jax.value_and_grad(make_loss_fn(cfg, graphdef), has_aux=True)
  accum = cfg.train.grad_accum
  start = cfg.group_aux_start

  def step(state, batch_AxBxL):
    """batch leaves: [grad_accum, batch/grad_accum, seq_len].

    Gradient accumulation equals one step on the whole batch for any loss mask: each
    micro-batch's LM loss is its summed token NLL over the scored tokens of the whole
    (global, all hosts) batch, and the micro-batches' gradients are summed. The auxiliary
    losses are per micro-batch (their statistics are; with loss.aux_tokens dividing the
    micro-batch, per chunk) and averaged over the micro-batches.
    """
    group_aux_on = (state["step"] >= start).astype(jnp.float32)
    lm_tokens = jnp.sum(batch_AxBxL["loss_mask"].astype(jnp.float32))

    def micro(grads, batch_BxL):
      (_, metrics), g = grad_fn(state["params"], batch_BxL, group_aux_on, lm_tokens,
                                1.0 / accum)
      return jax.tree.map(jnp.add, grads, g), metrics

    if accum == 1:  # no zero-filled gradient buffer to add into (2.8B floats at 3B)
      (_, metrics), grads = grad_fn(state["params"], jax.tree.map(lambda a: a[0], batch_AxBxL),
                                    group_aux_on, lm_tokens, 1.0)
    else:
      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      grads, metrics_A = jax.lax.scan(micro, zeros, batch_AxBxL)
      metrics = {k: jnp.sum(v, 0) for k, v in metrics_A.items()}  # the shares add up
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(state["step"])
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    return new_state, metrics

  return jax.jit(step, donate_argnums=0)


def make_eval_step(cfg: Config, graphdef: nnx.GraphDef):
  def eval_step(params, batch_BxL):
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch_BxL["inputs"], batch_BxL["positions"], batch_BxL["segment_ids"])
    loss, n = losses.cross_entropy(logits, batch_BxL["targets"], batch_BxL["loss_mask"])
    return loss * n, n
  return jax.jit(eval_step)


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class RunResult:
  step: int
  loss: float | None
  val_loss: float | None
  stopped_by_signal: bool


def _check_workdir(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe.{jax.process_index()}"  # hosts may share the workdir
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise TrainingError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def _check_data_fits(cfg: Config, prepared: data.Prepared) -> None:
  m, t = cfg.model, cfg.train
  if prepared.tokenizer.vocab_size > m.vocab_size:
    raise TrainingError(
        f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary "
        f"({prepared.tokenizer.vocab_size} ids, {cfg.data.tokenizer!r}); set "
        f"model.vocab_size={prepared.tokenizer.vocab_size} or larger")
  needed = t.batch_size * t.seq_len + 1
  if len(prepared.train_tokens) < needed:
    raise TrainingError(
        f"the training data ({len(prepared.train_tokens):,} tokens from {cfg.data.source!r}) "
        f"is smaller than one batch (train.batch_size={t.batch_size} x train.seq_len="
        f"{t.seq_len} = {needed - 1:,} tokens); add data or lower those values")


def _diff_config(saved: dict, now: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(saved) | set(now)):
    a, b = saved.get(k), now.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff_config(a, b, f"{prefix}{k}.")
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (
        list(b) if isinstance(b, (list, tuple)) else b):
      out.append(f"{prefix}{k} (checkpoint {a!r}, now {b!r})")
  return out


def _balance(cfg: Config, expert_tokens_LxE: np.ndarray) -> dict[str, Any]:
  """Per expert-parallel rank load (the mesh's expert axis; N ranks if it is 1, to show
  what the placement would give), for the configured placement and the naive contrast."""
  m = cfg.model
  ep = cfg.mesh.expert if cfg.mesh.expert > 1 else m.experts_per_group
  out: dict[str, Any] = {"ep_size": ep}
  for strategy in ("all_size", "naive"):
    if m.num_experts % ep:
      break
    rep = allocation.balance_report(expert_tokens_LxE, m.group_widths, m.experts_per_group, ep,
                                    m.d_model, strategy)
    prefix = "ep_" if strategy == cfg.mesh.placement else f"ep_{strategy}_"
    out.update({prefix + k: v for k, v in rep.items()})
  return out


class _StopFlag:
  """SIGTERM/SIGINT ask the loop to checkpoint and stop (`signal` is set); a run that has
  not stopped `grace_s` seconds after the first signal, or that gets a second one, exits
  at once without a checkpoint (exit status 128 + signal number).

  The exits cannot rely on Python signal handlers: those run only in the main thread,
  between bytecodes, so a main thread blocked in a device call (a step stuck in a
  collective) would never run them. The C-level handler also writes each signal's number
  to a wake-up pipe (`signal.set_wakeup_fd`), at once, whatever the main thread is doing;
  a watchdog thread reads it and owns the deadline and the second-signal exit."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, grace_s: float = 600.0, *, log=print):
    self.signal: int | None = None
    self.grace_s, self._log = grace_s, log
    self._old: dict = {}
    self._fds: tuple[int, int] | None = None
    self._timer: threading.Timer | None = None

  def __enter__(self):
    for sig in self.SIGNALS:
      self._old[sig] = signal.signal(sig, self._handle)
    r, w = os.pipe()
    os.set_blocking(w, False)
    self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    self._fds = (r, w)
    threading.Thread(target=self._watch, args=(r,), name="stop-watchdog", daemon=True).start()
    return self

  def _handle(self, signum, frame):
    if self.signal is None:
      self.signal = signum

  def _watch(self, r: int) -> None:
    try:
      self._read_signals(r)
    finally:
      os.close(r)

  def _read_signals(self, r: int) -> None:
    seen = 0
    while True:
      data = os.read(r, 64)
      if not data:  # write end closed: the run is over
        return
      for signum in data:
        if signum not in self.SIGNALS:
          continue
        seen += 1
        name = signal.Signals(signum).name
        if seen == 1:
          self._timer = threading.Timer(self.grace_s, self._exit, args=(
              signum, f"{name} {self.grace_s:g} s ago and the run has not stopped "
              "(train.stop_grace_s; is a step stuck?)"))
          self._timer.daemon = True
          self._timer.start()
        else:
          self._exit(signum, f"a second signal ({name})")

  def _exit(self, signum: int, why: str) -> None:
    self._log(f"stopping: {why}: exiting now without a checkpoint; checkpoints already "
              "written are intact")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)

  def __exit__(self, *exc):
    if self._timer is not None:
      self._timer.cancel()
    signal.set_wakeup_fd(self._old_wakeup)
    for sig, old in self._old.items():
      signal.signal(sig, old)
    r, w = self._fds
    os.close(w)  # the watchdog reads end-of-file, closes r and returns


def _put_batch(batch: dict[str, np.ndarray], accum: int, mesh) -> dict[str, jax.Array]:
  """[B, L] host rows -> [accum, B/accum, L] device arrays, B sharded over the batch axes."""
  B = next(iter(batch.values())).shape[0]
  target = sharding.batch_sharding(mesh, leading=1)
  return distributed.global_batch(
      {k: v.reshape(accum, B // accum, *v.shape[1:]) for k, v in batch.items()}, target)


def init_params_from(source: str, cfg: Config, mesh, params, log=print):
  """`params` with every parameter that the newest intact checkpoint of `source` (a
  workdir or its checkpoints/ directory) holds replaced by the checkpoint's value
  (train.init_from). Parameters the checkpoint lacks keep their values (a DSA indexer on
  a dense-trained model: its fresh initialisation); the checkpoint's parameters the model
  lacks are dropped. Both are logged; a parameter of another shape is an error."""
  from mohge_jax import config as config_lib

  directory = Path(source).expanduser()
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  if not directory.is_dir():
    raise TrainingError(f"train.init_from={source!r}: no such directory")
  src = Checkpointer(directory, keep=1 << 30, async_save=False)
  try:
    step, _ = src.newest_intact_step()
    if step is None:
      raise TrainingError(f"train.init_from={source!r}: no intact checkpoint in {directory}")
    meta = src.restore_meta(step)
    if meta.get("param_layout") != PARAM_LAYOUT:
      raise TrainingError(f"train.init_from: {directory}/{step} is of an older parameter layout")
    src_cfg = config_lib.from_dict(meta["config"])
    restored, _ = src.restore(step, abstract_state(src_cfg, mesh))
  finally:
    src.close()
  key = jax.tree_util.keystr
  loaded = {key(p): a for p, a in jax.tree_util.tree_leaves_with_path(restored["params"])}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out, fresh = [], []
  for path, a in leaves:
    b = loaded.pop(key(path), None)
    if b is None:
      fresh.append(key(path))
      out.append(a)
    elif b.shape != a.shape:
      raise TrainingError(f"train.init_from: {key(path)} is {b.shape} in {directory}/{step}, "
                          f"{a.shape} in this model")
    else:
      out.append(b.astype(a.dtype))
  log(f"initialised from {directory}/{step} (step 0 here, fresh optimizer state)"
      + (f"; kept fresh: {', '.join(fresh)}" if fresh else "")
      + (f"; dropped: {', '.join(sorted(loaded))}" if loaded else ""))
  return jax.tree_util.tree_unflatten(treedef, out)


class _Quiet:
  """Stands in for the metrics log and progress bar on hosts other than the first."""
  path = None

  def write(self, step, row):
    return {"step": step, **{k: plain(v) for k, v in row.items()}}

  def __getattr__(self, name):
    return lambda *a, **k: None


def _divergence_message(ckpt: Checkpointer, step: int, host: dict,
                        resumed_from: int | None) -> str:
  """Names as good only a checkpoint that verifies now, and blames the learning rate only
  if the run did not start from a checkpoint that fails verification."""
  head = (f"loss is {float(host['loss'])} (grad norm {float(host['grad_norm'])}) at step "
          f"{step}: training diverged")
  good, _ = ckpt.newest_intact_step(recheck=True)  # damage may have come since the resume
  last_good = (f"The last good (verified) checkpoint is "
               f"{'step ' + str(good) if good is not None else 'none'} in {ckpt.directory}")
  if resumed_from is not None and resumed_from in ckpt.all_steps():
    problem = ckpt.verify(resumed_from, recheck=True)
    if problem:
      return (f"{head} after resuming from {ckpt.step_dir(resumed_from)}, which fails "
              f"verification now ({problem}): the run may have started from damaged "
              f"parameters, which says nothing about train.lr. {last_good}; re-run the same "
              "command to move damaged checkpoints aside and resume from the newest intact one.")
  return (f"{head}. {last_good}; lower train.lr or raise train.warmup_steps, then re-run "
          "to resume from it.")


def train(cfg: Config, workdir: str | Path, *, log=print) -> RunResult:
  t_start = time.perf_counter()
  workdir = Path(workdir)
  main = distributed.is_main_process()
  if not main:
    log = lambda *a, **k: None  # noqa: E731
  _check_workdir(workdir)
  t = cfg.train
  prepared = data.prepare(cfg.data.source, cfg.data.tokenizer, val_permille=cfg.data.val_permille,
                          cache_dir=cfg.data.cache_dir or None,
                          eos_token=cfg.data.eos_token or None)
  _check_data_fits(cfg, prepared)
  eos = prepared.tokenizer.eos_id

  cache_dir = use_compile_cache(t.compile_cache)
  ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
  latest = ckpt.resume_step(log)  # the newest intact step; damaged newer ones moved aside
  if latest is not None:
    saved_meta = ckpt.restore_meta(latest)
    if saved_meta.get("param_layout") != PARAM_LAYOUT:
      raise TrainingError(
          f"the checkpoint at {ckpt.directory}/{latest} holds one entry per layer, written by "
          "a mohge-jax from before layers were stacked and scanned; this version cannot "
          "resume it. Export it with the version that wrote it, or use another --workdir.")
    saved = saved_meta["config"]
    model_now = {k: v for k, v in cfg.to_dict()["model"].items()
                 if k not in RUNTIME_MODEL_FIELDS}
    diffs = _diff_config({k: v for k, v in saved["model"].items()
                          if k not in RUNTIME_MODEL_FIELDS}, model_now)
    saved_warmup = (saved["model"].get("sparse_attention") == "dsa"
                    and saved["train"].get("dsa_stage") == "dense_warmup")
    if saved_warmup != dsa_warmup(cfg):  # the optimizer state differs: not resumable
      diffs.append(f"train.dsa_stage (checkpoint {saved['train'].get('dsa_stage')!r}, now "
                   f"{t.dsa_stage!r}): a new stage is a new run; start it in another "
                   f"--workdir with train.init_from={workdir}")
    if diffs:
      raise TrainingError(
          f"the checkpoint at {ckpt.directory}/{latest} was written with a different "
          f"config: {'; '.join(diffs[:6])}. Use another --workdir, or the same config.")
  if main:
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

  mesh = sharding.make_mesh(cfg.mesh)
  if not sharding.batch_size_divides(t.batch_size // t.grad_accum, mesh):
    raise TrainingError(
        f"train.batch_size/train.grad_accum = {t.batch_size // t.grad_accum} sequences must "
        f"divide evenly over the mesh's batch axes (data x fsdp x expert = "
        f"{mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']})")
  target = abstract_state(cfg, mesh)
  graphdef = graph_def(cfg)

  iterator = data.BatchIterator(prepared.train_tokens, seq_len=t.seq_len,
                                global_batch=t.batch_size, seed=t.seed, eos_id=eos,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(),
                                per_document=cfg.model.doc_attention_mask)
  t_init = time.perf_counter()
  if latest is None:
    state = jax.jit(make_init_fn(cfg), out_shardings=jax.tree.map(lambda a: a.sharding, target))(
        jnp.int32(t.seed))
    jax.block_until_ready(state)
    log(f"initialised a new model in {workdir} ({time.perf_counter() - t_init:.1f} s)")
    if t.init_from:
      state["params"] = init_params_from(t.init_from, cfg, mesh, state["params"], log)
  else:
    state, meta = ckpt.restore(latest, target)
    iterator.restore(meta["data"])
    log(f"resumed from step {latest} ({ckpt.directory}/{latest})")
  startup = {"init_s": time.perf_counter() - t_init}
  step = int(state["step"])
  if step != iterator.step:
    raise CheckpointError(f"checkpoint step {step} and data position {iterator.step} disagree")

  train_step = make_train_step(cfg, graphdef)
  eval_step = make_eval_step(cfg, graphdef)
  metrics_log = MetricsLog(workdir, resume_step=step) if main else _Quiet()
  progress = Progress(t.steps, step) if main else _Quiet()
  tokens_per_step = t.batch_size * t.seq_len

  def save(at_step: int) -> None:
    meta = {"data": iterator.state(), "config": cfg.to_dict(), "step": at_step,
            "param_layout": PARAM_LAYOUT}
    ckpt.save(at_step, state, meta)

  def evaluate() -> float | None:
    if t.eval_batches == 0 or len(prepared.val_tokens) <= t.seq_len:
      return None
    total, count = 0.0, 0.0
    for batch in data.eval_batches(prepared.val_tokens, seq_len=t.seq_len,
                                   batch=t.batch_size // t.grad_accum, eos_id=eos,
                                   max_batches=t.eval_batches,
                                   per_document=cfg.model.doc_attention_mask):
      s, n = eval_step(state["params"], {k: jnp.asarray(v) for k, v in batch.items()})
      total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)

  summary_startup: dict[str, float] = {}
  pending: dict[str, jax.Array] | None = None
  last_row: dict[str, Any] = {}
  val_loss = None
  stopped = False
  t_last, step_last = time.perf_counter(), step
  compiled = None
  with _StopFlag(t.stop_grace_s, log=log) as stop, jax.set_mesh(mesh):
    try:
      while step < t.steps:
        batch = _put_batch(next(iterator), t.grad_accum, mesh)
        if compiled is None:  # the first step: lower, compile, run, each timed
          t0 = time.perf_counter()
          lowered = train_step.lower(state, batch)
          t1 = time.perf_counter()
          compiled = lowered.compile()
          t2 = time.perf_counter()
          state, pending = compiled(state, batch)
          jax.block_until_ready(pending)
          t3 = time.perf_counter()
          startup.update(lower_s=t1 - t0, compile_s=t2 - t1, first_step_s=t3 - t2,
                         time_to_first_step_s=t3 - t0, since_start_s=t3 - t_start)
          log(f"first step after {t3 - t0:.1f} s (lower {t1 - t0:.1f} s, compile "
              f"{t2 - t1:.1f} s, step {t3 - t2:.1f} s; {t3 - t_start:.1f} s since start"
              + (f"; compilation cache {cache_dir}" if cache_dir else "") + ")")
          t_last = t2  # the first logged rate counts the first step, not its compilation
        else:
          state, pending = compiled(state, batch)
        step += 1
        progress.advance()
        due_log = step % t.log_every == 0 or step == t.steps
        due_ckpt = t.save_checkpoints and (step % t.ckpt_every == 0 or step == t.steps)
        due_eval = step % t.eval_every == 0 or step == t.steps
        # All hosts must agree to stop (a signal reaches each at a different step); with
        # several hosts that costs a host sync, so they compare only at log boundaries.
        check = jax.process_count() == 1 or due_log or due_ckpt or due_eval
        stop_now = check and distributed.any_process(stop.signal is not None)
        if due_log or due_ckpt or due_eval or stop_now:
          host = jax.device_get(pending)
          if not (math.isfinite(float(host["loss"])) and math.isfinite(float(host["grad_norm"]))):
            raise TrainingError(_divergence_message(ckpt, step, host, resumed_from=latest))
          now = time.perf_counter()
          row = {k: v for k, v in host.items() if not k.endswith("_tokens")}
          row["tokens_per_s"] = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
          if "group_tokens" in host:
            g = np.asarray(host["group_tokens"], np.float64)  # [layers, G]
            row["group_share"] = (g.sum(0) / g.sum()).tolist()
            row["group_share_by_layer"] = (g / g.sum(1, keepdims=True)).tolist()
            row.update(_balance(cfg, np.asarray(host["expert_tokens"])))
          if due_eval:
            val_loss = evaluate()
            if val_loss is not None:
              row["val_loss"], row["val_ppl"] = val_loss, math.exp(min(val_loss, 50.0))
          row["elapsed_s"] = now - t_start
          if startup:
            row.update(startup)  # the first logged row carries the start-up times
            summary_startup, startup = startup, {}
          last_row = metrics_log.write(step, row)
          eta = (t.steps - step) * (now - t_last) / max(step - step_last, 1)
          progress.show(step, last_row, eta)
          t_last, step_last = time.perf_counter(), step
        if due_ckpt or (stop_now and t.save_checkpoints):
          save(step)
        if stop_now:
          stopped = True
          why = signal.Signals(stop.signal).name if stop.signal else "a stop on another host"
          progress.note(f"received {why}: saved step {step}; re-run the same command to resume"
                        if t.save_checkpoints else
                        f"received {why}: stopped at step {step} (train.save_checkpoints=false)")
          break
    finally:
      ckpt.wait()
      ckpt.close()
      metrics_log.close()
      progress.close()

  loss = last_row.get("loss")
  summary = {**summary_startup, "step": step, "loss": loss, "val_loss": val_loss,
             "stopped_by_signal": stopped, "wall_s": time.perf_counter() - t_start,
             "checkpoints": str(ckpt.directory), "metrics": str(metrics_log.path)}
  if main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if not stopped:
    log(f"done: step {step}, loss {loss:.4f}"
        + (f", validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})"
           if val_loss is not None else "")
        + (f"; checkpoints in {ckpt.directory}" if t.save_checkpoints else "")
        + f", metrics in {metrics_log.path}")
  return RunResult(step=step, loss=loss, val_loss=val_loss, stopped_by_signal=stopped)

