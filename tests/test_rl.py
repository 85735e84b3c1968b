"""GRPO training (mohge_jax.rl): prompts per (seed, step), the SFT batch's loss mask, the
rl config's errors, and a toy run end to end: finite metrics, a checkpoint, a frozen
reference, and a resumed run ending bitwise equal to an uninterrupted one.

Not tested here: that the reward rises. On configs/rl_tiny.yaml it does (README), but that
takes ~150 SFT and ~150 GRPO steps, about 2 minutes on 2 CPU cores."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mohge_jax import losses, rl, sharding, trainer
from mohge_jax.checkpoint import Checkpointer
from mohge_jax.config import ConfigError, RLConfig, load_config
from mohge_jax.data import ByteTokenizer
from tests.test_generate import ROOT, TINY

TIMING = ("step_s", "sample_s", "update_s")


def test_prompts_are_a_function_of_seed_and_step():
  r = RLConfig(task="arithmetic", digits=2)
  a, b = rl.problems_at(r, 0, 5, 6), rl.problems_at(r, 0, 5, 6)
  assert a == b
  assert rl.problems_at(r, 0, 6, 6) != a and rl.problems_at(r, 1, 5, 6) != a
  assert rl.problems_at(r, 0, 5, 6, salt=1) != a  # SFT batches are other problems
  c = rl.problems_at(RLConfig(task="countdown", numbers=3), 0, 5, 2)
  assert c == rl.problems_at(RLConfig(task="countdown", numbers=3), 0, 5, 2)


def test_sft_batch_scores_only_the_answer(rng):
  tok = ByteTokenizer()
  problems = rl.problems_at(RLConfig(digits=int(rng.integers(1, 4))), int(rng.integers(1 << 30)),
                            0, 5)
  batch = rl.sft_batch(tok, problems, bucket=16)
  assert batch["inputs"].shape[1] % 16 == 0
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  for b, p in enumerate(problems):
    prompt = tok.encode(rl.prompt_text(p))
    scored = batch["targets"][b][batch["loss_mask"][b]].tolist()
    assert scored == tok.encode(rl.answer_text(p)) + [tok.eos_id]
    assert not batch["loss_mask"][b, :len(prompt) - 1].any()  # no prompt token is a target
  # The loss does not see the prompt: other prompt targets, the same loss.
  logits = jnp.asarray(rng.standard_normal((*batch["targets"].shape, 257)), jnp.float32)
  targets, mask = batch["targets"], jnp.asarray(batch["loss_mask"])
  other = np.where(batch["loss_mask"], targets, rng.integers(0, 256, targets.shape))
  want, _ = losses.cross_entropy(logits, jnp.asarray(targets), mask)
  got, _ = losses.cross_entropy(logits, jnp.asarray(other), mask)
  assert float(want) == float(got)


@pytest.mark.parametrize("override,needle", [
    ("rl.group_size=1", "rl.group_size"), ("rl.temperature=0", "rl.temperature"),
    ("rl.task=sorting", "rl.task"), ("rl.ops=/", "rl.ops"), ("rl.reference=ema", "rl.reference"),
    ("rl.top_p=0", "rl.top_p"), ("rl.sft_steps=-1", "rl.sft_steps"),
    ("rl.sft_stop_accuracy=1.5", "rl.sft_stop_accuracy"), ("rl.sft_eval_every=0", "rl.sft_eval_every")])
def test_rl_config_errors(override, needle):
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    load_config(str(ROOT / "configs/rl_tiny.yaml"), [override])


SFT, GRPO = 2, 3
# One layer, routed (no dense first layer): the run loop, its metrics, reference and
# resume do not depend on the depth, and a routed layer keeps rl.keep_routing's path
# (test_grpo.py checks the routing with dense and routed layers mixed); a third less
# compilation than two layers.
TOY = TINY + ["model.num_layers=1", "model.first_dense_layers=0", f"rl.sft_steps={SFT}",
              f"train.steps={GRPO}", "rl.prompts_per_step=2", "rl.group_size=3",
              "rl.max_new_tokens=8", "rl.prompt_bucket=16", "rl.sft_batch_size=4",
              "train.ckpt_every=1", "train.keep_checkpoints=100", "train.log_every=100"]


def _target(cfg):
  return trainer.abstract_state(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def _params(cfg, workdir, step):
  with Checkpointer(workdir / "checkpoints", async_save=False) as c:
    state, _ = c.restore(step, _target(cfg))
  return state["params"]


def _rows(workdir):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_toy_run_writes_metrics_keeps_the_reference_and_resumes_bitwise(tmp_path):
  cfg = load_config(str(ROOT / "configs/rl_tiny.yaml"),
                    TOY + [f"train.compile_cache={tmp_path / 'xla'}"])
  work = tmp_path / "clean"
  rl.run(cfg, work, log=lambda *a: None)
  rows = _rows(work)
  assert [r["step"] for r in rows] == list(range(1, SFT + GRPO + 1))
  assert [r["phase"] for r in rows] == ["sft"] * SFT + ["grpo"] * GRPO
  for r in rows:
    assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
  for key in ("reward_mean", "reward_std", "accuracy", "kl", "clip_fraction",
              "response_length", "masked_sequence_fraction"):
    assert key in rows[-1]
  assert (work / "rl_plots.png").is_file()

  # The reference is the policy as GRPO started (after SFT), untouched by the updates.
  with Checkpointer(work / "reference", async_save=False) as c:
    assert c.all_steps() == [SFT]
    ref = c.restore(SFT, {"params": _target(cfg)["params"]})[0]["params"]
  at_start, final = _params(cfg, work, SFT), _params(cfg, work, SFT + GRPO)
  jax.tree.map(np.testing.assert_array_equal, ref, at_start)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(final)))

  # Interrupted as GRPO starts (the reference already saved) and after its first step:
  # resuming ends where the clean run ended.
  for last in (SFT, SFT + 1):
    resumed = tmp_path / f"resumed{last}"
    shutil.copytree(work, resumed)
    for step in range(last + 1, SFT + GRPO + 1):
      shutil.rmtree(resumed / "checkpoints" / str(step))
    rl.run(cfg, resumed, log=lambda *a: None)
    assert _rows(resumed) == rows
    jax.tree.map(np.testing.assert_array_equal, _params(cfg, resumed, SFT + GRPO), final)


def test_rollouts_without_the_sampling_mask():
  from mohge_jax import generate as gen
  from mohge_jax import grpo
  prompts, lengths = gen.pad_prompts([[1, 2, 3], [4]])
  out = gen.Generated(tokens=np.array([[5, 6], [7, 0]]), logprobs=np.array([[-1., -2.], [-3., 0.]]),
                      sampling_mask=None, lengths=np.array([2, 1]))
  batch = grpo.completion_batch(prompts, lengths, out)
  assert batch.allowed is None
  np.testing.assert_array_equal(batch.tokens, [[1, 2, 3, 5, 6], [4, 7, 0, 0, 0]])
  np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 1, 1], [1, 0, 0, 0]])
  np.testing.assert_array_equal(batch.old_logprobs, [[0, 0, -1, -2], [-3, 0, 0, 0]])
  with pytest.raises(ValueError, match="keep_sampling_mask"):
    grpo.policy_logprobs(None, batch, keep_sampling_mask=True, keep_routing=False)


def test_evaluate_scores_each_problems_own_greedy_completion(monkeypatch):
  """rl.evaluate on scripted completions (generate replaced): right answers to some
  problems, wrong or unformatted ones to others, each scored against the arithmetic done
  here from the prompt text, and generate called greedy."""
  from mohge_jax import generate as gen
  cfg = load_config(str(ROOT / "configs/rl_tiny.yaml"), ["rl.digits=2", "rl.ops=+-"])
  tok, n = ByteTokenizer(), 9
  problems = rl.problems_at(cfg.rl, cfg.train.seed, 0, n, salt=rl.EVAL_SALT)
  truth = [eval(p.prompt.removeprefix("Compute ").removesuffix("."))  # noqa: S307
           for p in problems]
  texts = [f"<answer>{v}</answer>" if i % 3 == 0 else f"<answer>{v + 1}</answer>"
           if i % 3 == 1 else str(v) for i, v in enumerate(truth)]
  seen = {}

  def scripted(model, prompts_BxP, lengths_B, key, **kw):
    seen.update(kw, prompts=[tok.decode([int(t) for t in row[:k]])
                             for row, k in zip(np.asarray(prompts_BxP), lengths_B)])
    ids = [tok.encode(t) + [tok.eos_id] for t in texts]
    width = max(map(len, ids))
    tokens = np.array([r + [0] * (width - len(r)) for r in ids], np.int32)
    return gen.Generated(tokens, np.zeros(tokens.shape, np.float32), None,
                         np.array([len(r) for r in ids], np.int32))

  monkeypatch.setattr(gen, "generate", scripted)
  ev = rl.evaluate(cfg, None, tok, n)
  assert seen["temperature"] == 0.0 and seen["prompts"] == [rl.prompt_text(p) for p in problems]
  assert [c["correct"] for c in ev["completions"]] == [i % 3 == 0 for i in range(n)]
  assert [c["completion"] for c in ev["completions"]] == texts
  assert ev["accuracy"] == pytest.approx(3 / 9) and ev["format_rate"] == pytest.approx(6 / 9)
  assert ev["reward_mean"] == pytest.approx((3 * 1.1 + 3 * 0.1) / 9)


def test_grpo_benchmark_end_to_end_at_toy_size(tmp_path):
  """python -m benchmarks.grpo: pretraining (train.py), SFT + GRPO from it, evaluation
  before and after; its JSON agrees with the run's own metrics."""
  from benchmarks import grpo as bench
  out = tmp_path / "grpo.json"
  assert bench.main(["--config", str(ROOT / "configs/rl_tiny.yaml"), "--pretrain-steps", "2",
                     "--pretrain-batch", "8", "--eval-problems", "4", "--samples", "2",
                     "--run-dir", str(tmp_path / "run"), "--out", str(out), *TOY,
                     f"train.compile_cache={tmp_path / 'xla'}"]) == 0
  res = json.loads(out.read_text())
  assert res["phases"]["pretrain"]["steps"] == 2 and (tmp_path / "run/pretrain/checkpoints/2").is_dir()
  rows = _rows(tmp_path / "run/rl")
  grpo_rows = [r for r in rows if r["phase"] == "grpo"]
  assert [r["step"] for r in res["grpo_curve"]] == [r["step"] for r in grpo_rows]
  assert res["grpo_summary"]["end"]["reward_mean"] == pytest.approx(grpo_rows[-1]["reward_mean"])
  for name in ("before_grpo", "after_grpo"):
    ev = res["evaluation"][name]
    assert ev["problems"] == 4 and len(ev["samples"]) == 2 and 0 <= ev["accuracy"] <= 1
  assert (tmp_path / "grpo_rewards.png").is_file()


def test_sft_stops_early_at_the_target_accuracy_and_resumes_alike(tmp_path, monkeypatch):
  """rl.sft_stop_accuracy: SFT's held-out check (rl.evaluate replaced by scripted
  accuracies) every rl.sft_eval_every steps; the first that reaches the target jumps to
  step rl.sft_steps, where GRPO starts (reference saved there); a run resumed before the
  jump skips alike."""
  cfg = load_config(str(ROOT / "configs/rl_tiny.yaml"),
                    TOY + ["rl.sft_steps=6", "rl.sft_eval_every=2", "rl.sft_eval_problems=5",
                           "rl.sft_stop_accuracy=0.4", f"train.compile_cache={tmp_path / 'xla'}"])
  accuracies, calls = iter([0.1, 0.5]), []

  def scripted(cfg_, model, tokenizer, num_problems, *, salt=rl.EVAL_SALT):
    calls.append((num_problems, salt))
    return {"accuracy": next(accuracies)}

  monkeypatch.setattr(rl, "evaluate", scripted)
  work = tmp_path / "clean"
  rl.run(cfg, work, log=lambda *a: None)
  assert calls == [(5, rl.SFT_EVAL_SALT)] * 2
  rows = _rows(work)
  assert [r["step"] for r in rows] == [1, 2, 3, 6, 7, 8, 9]
  assert [r["phase"] for r in rows] == ["sft"] * 4 + ["grpo"] * GRPO
  assert [r.get("sft_eval_accuracy") for r in rows[:4]] == [None, 0.1, None, 0.5]
  with Checkpointer(work / "reference", async_save=False) as c:
    assert c.all_steps() == [6]
    ref = c.restore(6, {"params": _target(cfg)["params"]})[0]["params"]
  jax.tree.map(np.testing.assert_array_equal, ref, _params(cfg, work, 6))

  resumed = tmp_path / "resumed"  # interrupted after step 3, before the check that stops
  shutil.copytree(work, resumed)
  for step in (6, 7, 8, 9):
    shutil.rmtree(resumed / "checkpoints" / str(step))
  shutil.rmtree(resumed / "reference")
  accuracies = iter([0.5])
  rl.run(cfg, resumed, log=lambda *a: None)
  assert _rows(resumed) == rows
  jax.tree.map(np.testing.assert_array_equal, _params(cfg, resumed, 9), _params(cfg, work, 9))


def test_sft_runs_every_step_below_the_target_accuracy(tmp_path, monkeypatch):
  cfg = load_config(str(ROOT / "configs/rl_tiny.yaml"),
                    TOY + ["rl.sft_steps=4", "rl.sft_eval_every=2", "rl.sft_stop_accuracy=0.4",
                           "train.steps=1", f"train.compile_cache={tmp_path / 'xla'}"])
  monkeypatch.setattr(rl, "evaluate", lambda *a, **k: {"accuracy": 0.3})
  rl.run(cfg, tmp_path / "w", log=lambda *a: None)
  rows = _rows(tmp_path / "w")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert [r["phase"] for r in rows] == ["sft"] * 4 + ["grpo"]
  assert [r.get("sft_eval_accuracy") for r in rows] == [None, 0.3, None, 0.3, None]
