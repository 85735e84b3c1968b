"""GRPO training (spec §4): an SFT warm-up on the task's format, then sample, score, update.

    python -m mohge_jax.rl --config configs/rl_tiny.yaml --workdir W \\
        [--init-from WORKDIR_OR_EXPORT] [section.key=value ...]

Steps 0 .. rl.sft_steps-1 are supervised (prompt + "<answer>ANSWER</answer>" + end of text,
the loss on the answer tokens only; with rl.sft_stop_accuracy, SFT ends early, jumping to
step rl.sft_steps, once the greedy held-out accuracy reaches it); the next train.steps are
GRPO steps:

    problems = problems_at(cfg.rl, seed, step)           # deterministic per (seed, step)
    out = generate(policy, prompts x G, key(seed, step), record_routes=keep_routing)
    rewards_PxG = tasks.reward(problem, decoded completion)
    A = group_advantages(rewards_PxG)
    ref_logp = policy_logprobs(reference, rollouts)      # frozen: the policy as GRPO starts
    rl.updates_per_step x: params -= grad grpo_loss(policy_logprobs(policy, rollouts), ...)

The training state is the trainer's ({params, opt_state, step, rng}; `step` counts SFT and
GRPO steps), so an RL workdir is read by `generate`, `export` and `train.init_from` like
any other. The reference parameters are saved once, as GRPO starts, to WORKDIR/reference.
Re-running the command resumes from the newest intact checkpoint: prompts and sampling keys
depend only on (train.seed, step), so a resumed run continues as an uninterrupted one.
SFT uses rl.sft_lr at a constant rate; GRPO starts a fresh AdamW with train's lr schedule
over train.steps. Single device; the MoE auxiliary losses are not applied in either phase.

Writes: checkpoints/, reference/, metrics.jsonl (phase "sft": sft_loss; phase "grpo":
reward mean/std, accuracy, format rate, KL, clip fraction, response length, masked-sequence
fraction, ...), config.yaml, summary.json and rl_plots.png (mohge_jax.plot.plot_rl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from mohge_jax import generate as gen
from mohge_jax import grpo, losses, sharding, tasks, trainer
from mohge_jax.checkpoint import Checkpointer, CheckpointError
from mohge_jax.config import Config, ConfigError, RLConfig, load_config
from mohge_jax.data import make_tokenizer
from mohge_jax.metrics import MetricsLog
from mohge_jax.optimizer import make_optimizer

# ----------------------------------------------------------------------------- the task


def prompt_text(problem: tasks.Problem) -> str:
  return problem.prompt + "\n"


def answer_text(problem: tasks.Problem) -> str:
  """The reference completion in the task's format (what SFT teaches)."""
  return f"<answer>{problem.answer}</answer>"


def problems_at(r: RLConfig, seed: int, step: int, n: int, *, salt: int = 0) -> list[tasks.Problem]:
  """n problems, a function of (seed, step, salt) only (salt 1: the SFT batches)."""
  rng = np.random.default_rng([seed, step, salt])
  if r.task == "arithmetic":
    return [tasks.arithmetic(rng, r.digits, r.ops) for _ in range(n)]
  return [tasks.countdown(rng, r.numbers, r.max_value) for _ in range(n)]


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def sft_batch(tokenizer, problems: list[tasks.Problem], bucket: int = 1) -> dict[str, np.ndarray]:
  """Next-token batch of prompt + answer + end of text, right-padded to a multiple of
  `bucket`: inputs/targets int32 [B, L], loss_mask bool [B, L], True exactly where the
  target is an answer token (or the end of text), never on a prompt token or padding."""
  rows = [(tokenizer.encode(prompt_text(p)), tokenizer.encode(answer_text(p)) + [tokenizer.eos_id])
          for p in problems]
  L = _round_up(max(len(q) + len(a) for q, a in rows) - 1, bucket)
  tokens = np.zeros((len(rows), L + 1), np.int32)
  mask = np.zeros((len(rows), L), bool)
  for b, (q, a) in enumerate(rows):
    tokens[b, :len(q) + len(a)] = q + a
    mask[b, len(q) - 1:len(q) + len(a) - 1] = True  # target t is token t + 1
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


# ----------------------------------------------------------------------------- the steps


def sft_optimizer(cfg: Config) -> optax.GradientTransformation:
  """train's AdamW (same state layout) at the constant rate rl.sft_lr."""
  t = dataclasses.replace(cfg.train, lr=cfg.rl.sft_lr, min_lr=cfg.rl.sft_lr, warmup_steps=0,
                          steps=max(cfg.rl.sft_steps, 1))
  return make_optimizer(t)


def make_sft_step(graphdef, tx):
  def step(params, opt_state, batch_BxL):
    def loss_fn(p):
      logits_BxLxV, _ = nnx.merge(graphdef, p)(batch_BxL["inputs"])
      loss, _ = losses.cross_entropy(logits_BxLxV, batch_BxL["targets"], batch_BxL["loss_mask"])
      return loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            {"sft_loss": loss, "grad_norm": optax.tree.norm(grads)})
  return jax.jit(step, donate_argnums=(0, 1))


def make_grpo_fns(cfg: Config, graphdef, tx, keep_routing: bool):
  """(reference log-probs, one jitted GRPO update)."""
  r = cfg.rl
  logprobs = lambda params, batch: grpo.policy_logprobs(  # noqa: E731
      nnx.merge(graphdef, params), batch, keep_sampling_mask=r.keep_sampling_mask,
      keep_routing=keep_routing)

  def update(params, opt_state, batch, ref_logp_BxT, advantages_B):
    def loss_fn(p):
      return grpo.grpo_loss(logprobs(p, batch), batch.old_logprobs, ref_logp_BxT, advantages_B,
                            batch.loss_mask, clip_eps=r.clip_eps, beta=r.kl_coef,
                            unbiased_kl=r.unbiased_kl,
                            offpolicy_delta=r.offpolicy_delta if r.offpolicy_masking else None)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)})
  return jax.jit(logprobs), jax.jit(update, donate_argnums=(0, 1))


def rollout(cfg: Config, model, tokenizer, step: int, keep_routing: bool):
  """Samples rl.group_size completions of each of the step's prompts and scores them:
  (Rollouts, rewards [P*G], correct [P*G] bool, completion texts, problems)."""
  r = cfg.rl
  problems = problems_at(r, cfg.train.seed, step, r.prompts_per_step)
  prompts = [tokenizer.encode(prompt_text(p)) for p in problems for _ in range(r.group_size)]
  prompts_BxP, lengths_B = gen.pad_prompts(prompts)
  P = _round_up(prompts_BxP.shape[1], r.prompt_bucket)
  prompts_BxP = np.pad(prompts_BxP, ((0, 0), (0, P - prompts_BxP.shape[1])))
  key = jax.random.fold_in(jax.random.key(cfg.train.seed), step)
  out = gen.generate(model, prompts_BxP, lengths_B, key, max_new_tokens=r.max_new_tokens,
                     temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                     stop_ids=(tokenizer.eos_id,), record_routes=keep_routing,
                     return_mask=r.keep_sampling_mask)
  batch = grpo.completion_batch(prompts_BxP, lengths_B, out, temperature=r.temperature)
  texts = _texts(tokenizer, out)
  rewards, correct = _score(r, [p for p in problems for _ in range(r.group_size)], texts)
  return batch, rewards, correct, texts, problems, np.asarray(out.lengths)


def _texts(tokenizer, out: gen.Generated) -> list[str]:
  """Each row's completion, decoded without its stop token."""
  tokens_BxN, gen_B = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tokenizer.decode([int(i) for i in tokens_BxN[b, :gen_B[b]] if i != tokenizer.eos_id])
          for b in range(len(gen_B))]


def _score(r: RLConfig, problems: list[tasks.Problem], texts: list[str]
           ) -> tuple[np.ndarray, np.ndarray]:
  """(rewards float32 [B], exact answers bool [B]) of completion b to problem b."""
  rewards, correct = [], []
  for p, text in zip(problems, texts, strict=True):
    rewards.append(tasks.reward(p, text, format_weight=r.format_weight,
                                require_think=r.require_think))
    answer = tasks.extract_answer(text, r.require_think)
    correct.append(answer is not None and tasks.is_correct(p, answer))
  return np.asarray(rewards, np.float32), np.asarray(correct)


EVAL_SALT = 2  # held-out draws: no training step uses this salt (0: GRPO, 1: SFT)
SFT_EVAL_SALT = 3  # the held-out problems of rl.sft_stop_accuracy's check (not EVAL_SALT's)


def evaluate(cfg: Config, model, tokenizer, num_problems: int, *, salt: int = EVAL_SALT) -> dict:
  """Greedy (temperature 0) completions of `num_problems` held-out problems (drawn with
  `salt`; on a small task some may equal training problems by value), in one batch:
  accuracy, format rate, mean reward and every (prompt, completion, correct)."""
  r = cfg.rl
  problems = problems_at(r, cfg.train.seed, 0, num_problems, salt=salt)
  prompts_BxP, lengths_B = gen.pad_prompts([tokenizer.encode(prompt_text(p)) for p in problems])
  P = _round_up(prompts_BxP.shape[1], r.prompt_bucket)
  prompts_BxP = np.pad(prompts_BxP, ((0, 0), (0, P - prompts_BxP.shape[1])))
  out = gen.generate(model, prompts_BxP, lengths_B, jax.random.key(0),
                     max_new_tokens=r.max_new_tokens, temperature=0.0,
                     stop_ids=(tokenizer.eos_id,), return_mask=False)
  texts = _texts(tokenizer, out)
  rewards, correct = _score(r, problems, texts)
  return {"problems": num_problems, "accuracy": float(correct.mean()),
          "format_rate": float(np.mean([tasks.extract_answer(x, r.require_think) is not None
                                        for x in texts])),
          "reward_mean": float(rewards.mean()),
          "completions": [{"prompt": p.prompt, "completion": x, "correct": bool(c)}
                          for p, x, c in zip(problems, texts, correct)]}


# ----------------------------------------------------------------------------- the loop


def _init_params(source: str, cfg: Config, mesh, params, log):
  """params from an export directory or a training workdir (trainer.init_params_from)."""
  path = Path(source).expanduser()
  if not (path / "model.safetensors").is_file():
    return trainer.init_params_from(source, cfg, mesh, params, log)
  from mohge_jax import export
  model, _ = export.load(path)
  loaded = nnx.state(model)
  if jax.tree.structure(loaded) != jax.tree.structure(params) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params))):
    raise trainer.TrainingError(f"--init-from {source}: the export's parameters do not match "
                                "this config's model")
  log(f"initialised from the export {path}")
  return jax.tree.map(lambda a, b: jax.device_put(a.astype(b.dtype), b.sharding), loaded, params)


def run(cfg: Config, workdir: str | Path, *, init_from: str = "", log=print) -> dict:
  """Runs (or resumes) SFT then GRPO in `workdir`; returns the summary."""
  t_start = time.perf_counter()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t, r = cfg.train, cfg.rl
  tok = make_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
  if tok.vocab_size > cfg.model.vocab_size:
    raise trainer.TrainingError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                                f"tokenizer's vocabulary ({tok.vocab_size})")
  keep_routing = r.keep_routing and any(k != "dense" for k in cfg.model.ffn_kinds)
  total = r.sft_steps + t.steps

  trainer.use_compile_cache(t.compile_cache)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  target = trainer.abstract_state(cfg, mesh)
  graphdef = trainer.graph_def(cfg)
  ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=False)
  ref_ckpt = Checkpointer(workdir / "reference", keep=1, async_save=False)
  latest = ckpt.resume_step(log)
  if latest is None:
    state = jax.jit(trainer.make_init_fn(cfg),
                    out_shardings=jax.tree.map(lambda a: a.sharding, target))(jnp.int32(t.seed))
    if init_from:
      state["params"] = _init_params(init_from, cfg, mesh, state["params"], log)
  else:
    if ckpt.restore_meta(latest).get("kind") != "rl":
      raise CheckpointError(f"{ckpt.directory}/{latest} was not written by mohge_jax.rl; use "
                            "another --workdir (and --init-from that one)")
    state, _ = ckpt.restore(latest, target)
    log(f"resumed from step {latest}")
  (workdir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
  step = int(state["step"])

  ref_params = None
  if step > r.sft_steps or (step == r.sft_steps and ref_ckpt.latest_step() is not None):
    ref_params, _ = ref_ckpt.restore(None, {"params": target["params"]})
    ref_params = ref_params["params"]
  sft_step = make_sft_step(graphdef, sft_optimizer(cfg))
  tx = make_optimizer(t)
  ref_logprobs, grpo_update = make_grpo_fns(cfg, graphdef, tx, keep_routing)
  metrics_log = MetricsLog(workdir, resume_step=step)

  def save(at: int) -> None:
    ckpt.save(at, state, {"config": cfg.to_dict(), "step": at, "kind": "rl",
                          "param_layout": trainer.PARAM_LAYOUT})

  last: dict = {}
  stopped = False
  with trainer._StopFlag(t.stop_grace_s, log=log) as stop, jax.set_mesh(mesh):
    try:
      while step < total:
        t0 = time.perf_counter()
        sft_done = False
        if step < r.sft_steps:
          problems = problems_at(r, t.seed, step, r.sft_batch_size, salt=1)
          batch = {k: jnp.asarray(v) for k, v in sft_batch(tok, problems, 16).items()}
          state["params"], state["opt_state"], m = sft_step(state["params"], state["opt_state"],
                                                            batch)
          row = {"phase": "sft", **jax.device_get(m)}
          if r.sft_stop_accuracy > 0 and (step + 1) % r.sft_eval_every == 0:
            row["sft_eval_accuracy"] = evaluate(
                cfg, nnx.merge(graphdef, state["params"]), tok, r.sft_eval_problems,
                salt=SFT_EVAL_SALT)["accuracy"]
            sft_done = step + 1 < r.sft_steps and row["sft_eval_accuracy"] >= r.sft_stop_accuracy
        else:
          if step == r.sft_steps:  # GRPO starts: freeze the reference, a fresh optimizer
            if ref_params is None:  # (a run resumed here may have saved it already)
              ref_params = jax.tree.map(jnp.copy, state["params"])
              ref_ckpt.save(step, {"params": ref_params}, {"step": step})
            state["opt_state"] = jax.jit(tx.init)(state["params"])
          row = grpo_step(cfg, state, ref_params, tok, step, keep_routing, graphdef,
                          ref_logprobs, grpo_update)
        if not math.isfinite(float(row.get("loss", row.get("sft_loss")))):
          raise trainer.TrainingError(f"loss is {row} at step {step}: diverged; lower the "
                                      "learning rate (train.lr or rl.sft_lr)")
        step += 1
        if sft_done:  # deterministic given the checkpoint, so a resumed run skips alike
          log(f"step {step}: SFT's held-out greedy accuracy {row['sft_eval_accuracy']:.3f} >= "
              f"rl.sft_stop_accuracy={r.sft_stop_accuracy}: GRPO starts (SFT steps "
              f"{step}..{r.sft_steps - 1} skipped)")
          step = r.sft_steps
        state["step"] = jnp.asarray(step, jnp.int32)
        row["step_s"] = time.perf_counter() - t0
        last = metrics_log.write(step, row)
        if step % t.log_every == 0 or step == total:
          shown = {k: v for k, v in last.items() if isinstance(v, float) and not k.endswith("_s")}
          log(f"step {step}/{total} [{row['phase']}] "
              + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        stop_now = stop.signal is not None
        if t.save_checkpoints and (step % t.ckpt_every == 0 or step == total or stop_now
                                or sft_done):
          save(step)
        if stop_now:
          stopped = True
          log(f"received a signal: saved step {step}; re-run the same command to resume")
          break
    finally:
      ckpt.close()
      ref_ckpt.close()
      metrics_log.close()

  summary = {"step": step, "stopped_by_signal": stopped, "last": last,
             "wall_s": time.perf_counter() - t_start, "metrics": str(metrics_log.path)}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if step > 0:
    from mohge_jax import plot
    summary["plot"] = str(plot.plot_rl(workdir))
  return summary


def grpo_step(cfg: Config, state: dict, ref_params, tok, step: int, keep_routing: bool,
              graphdef, ref_logprobs, grpo_update) -> dict:
  """Samples, scores and updates `state` in place; returns the step's metrics."""
  r = cfg.rl
  t0 = time.perf_counter()
  model = nnx.merge(graphdef, state["params"])
  batch, rewards_B, correct_B, texts, problems, gen_B = rollout(cfg, model, tok, step,
                                                                keep_routing)
  rewards_PxG = rewards_B.reshape(r.prompts_per_step, r.group_size)
  advantages_B = grpo.group_advantages(jnp.asarray(rewards_PxG)).reshape(-1)
  ref_logp_BxT = ref_logprobs(ref_params, batch)
  t1 = time.perf_counter()
  for _ in range(r.updates_per_step):
    state["params"], state["opt_state"], m = grpo_update(state["params"], state["opt_state"],
                                                         batch, ref_logp_BxT, advantages_B)
  m = jax.device_get(m)
  B = len(rewards_B)
  return {"phase": "grpo", "loss": float(m["loss"]), "reward_mean": float(rewards_B.mean()),
          "reward_std": float(rewards_B.std()),
          "reward_group_std": float(rewards_PxG.std(-1).mean()),  # within groups
          "reward_group_mean_std": float(rewards_PxG.mean(-1).std()),  # across groups
          "accuracy": float(correct_B.mean()),
          "format_rate": float(np.mean([tasks.extract_answer(x, r.require_think) is not None
                                        for x in texts])),
          "zero_advantage_groups": float(np.mean(rewards_PxG.std(-1) == 0)),
          "kl": float(m["kl"]), "clip_fraction": float(m["clip_fraction"]),
          "masked_sequence_fraction": float(m["masked_sequences"]) / B,
          "offpolicy_kl": float(m["offpolicy_kl"]), "grad_norm": float(m["grad_norm"]),
          "response_length": float(np.mean(gen_B)), "sample_s": t1 - t0,
          "update_s": time.perf_counter() - t1,
          "sample": f"{problems[0].prompt!r} -> {texts[0]!r}"}


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m mohge_jax.rl", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="YAML config file (configs/rl_tiny.yaml)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--init-from", default="",
                 help="a training workdir or an export whose parameters start the run "
                      "(ignored when --workdir already has a checkpoint)")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = p.parse_args(argv)
  try:
    cfg = load_config(args.config, args.overrides)
    run(cfg, args.workdir, init_from=args.init_from)
  except (ConfigError, CheckpointError, trainer.TrainingError, ValueError,
          FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
