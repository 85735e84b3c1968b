"""GRPO on a verifiable task, end to end on one device: pretraining, SFT, GRPO, evaluation.

    python -m benchmarks.grpo [--config configs/rl_small.yaml] [--pretrain-steps 300]
        [--pretrain-batch 64] [--pretrain-lr 1e-3] [--eval-problems 256] [--samples 8]
        [--run-dir DIR] [--out benchmarks/results/grpo_h200.json] [section.key=value ...]

1. Pretraining (skipped with --pretrain-steps 0): `train.py` with the config's model on its
   data.source for --pretrain-steps steps, in its own process, into RUN_DIR/pretrain.
2. `mohge_jax.rl.run` from those parameters into RUN_DIR/rl: rl.sft_steps of SFT on the
   answer format, then train.steps GRPO steps (its checkpoints, metrics and plot).
3. Evaluation: greedy answers to --eval-problems held-out problems (`rl.evaluate`) by the
   policy as GRPO started (RUN_DIR/rl/reference: the end of SFT) and as it ended.

Writes --out (rewritten after each phase) with the setup, each phase's wall time, the GRPO
curve per step (reward mean, exact-answer accuracy, format rate, reward spread within and
across prompt groups, KL, clip fraction, response length), its start and end (means over
the first and last tenth of the GRPO steps; the spread is the standard deviation across
prompt groups of their mean reward), and the evaluation before and after, with the first
--samples completions of each; and `<out>_rewards.png` (mohge_jax.plot.plot_rl). The
overrides apply to both phases (the model must be the same); pretraining also gets
train.steps/batch_size/lr/min_lr from the --pretrain-* flags.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _window(rows: list[dict], key: str, part: slice) -> float | None:
  vals = [r[key] for r in rows[part] if key in r]
  return sum(vals) / len(vals) if vals else None


def curve_summary(grpo_rows: list[dict]) -> dict:
  """Means over the first and the last tenth (at least one step) of the GRPO steps."""
  n = max(1, len(grpo_rows) // 10)
  keys = ("reward_mean", "accuracy", "format_rate", "reward_group_mean_std", "kl",
          "response_length")
  return {name: {k: _window(grpo_rows, k, part) for k in keys}
          for name, part in (("start", slice(0, n)), ("end", slice(-n, None)))}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/rl_small.yaml")
  ap.add_argument("--pretrain-steps", type=int, default=300)
  ap.add_argument("--pretrain-batch", type=int, default=64)
  ap.add_argument("--pretrain-lr", type=float, default=1e-3)
  ap.add_argument("--eval-problems", type=int, default=256)
  ap.add_argument("--samples", type=int, default=8, help="completions kept per evaluation")
  ap.add_argument("--run-dir", default="runs/grpo")
  ap.add_argument("--out", default="benchmarks/results/grpo_h200.json")
  ap.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = ap.parse_args(argv)

  import jax
  from flax import nnx

  from mohge_jax import rl, trainer
  from mohge_jax.checkpoint import Checkpointer
  from mohge_jax.config import load_config
  from mohge_jax.data import make_tokenizer
  from mohge_jax.generate import load_model
  from mohge_jax.plot import read_metrics

  cfg = load_config(args.config, args.overrides)
  run_dir, out = Path(args.run_dir), Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  result = {"what": "GRPO on a verifiable task (benchmarks/grpo.py)",
            "command": " ".join(["python -m benchmarks.grpo", *(argv or sys.argv[1:])]),
            "date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "jax_version": jax.__version__, "config": cfg.to_dict(), "phases": {}}

  def write() -> None:
    out.write_text(json.dumps(result, indent=1) + "\n")

  pre_dir = run_dir / "pretrain"
  if args.pretrain_steps:
    t0 = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", args.config, "--workdir",
           str(pre_dir), *args.overrides, f"train.steps={args.pretrain_steps}",
           f"train.batch_size={args.pretrain_batch}", f"train.lr={args.pretrain_lr}",
           f"train.min_lr={args.pretrain_lr / 10}", "train.warmup_steps=20"]
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
      raise SystemExit(f"pretraining failed: see {pre_dir}")
    summary = json.loads((pre_dir / "summary.json").read_text())
    result["phases"]["pretrain"] = {"steps": args.pretrain_steps, "wall_s": time.perf_counter() - t0,
                                    **{k: summary.get(k) for k in ("loss", "val_loss")}}
    write()

  rl_dir = run_dir / "rl"
  if rl_dir.exists():  # a fresh run: rl.run would resume an old one
    shutil.rmtree(rl_dir)
  t0 = time.perf_counter()
  rl.run(cfg, rl_dir, init_from=str(pre_dir) if args.pretrain_steps else "")
  rows = read_metrics(rl_dir)
  sft = [r for r in rows if r.get("phase") == "sft"]
  grpo_rows = [r for r in rows if r.get("phase") == "grpo"]
  keys = ("step", "reward_mean", "accuracy", "format_rate", "reward_group_std",
          "reward_group_mean_std", "kl", "clip_fraction", "masked_sequence_fraction",
          "response_length", "sample")
  result["phases"]["rl"] = {"wall_s": time.perf_counter() - t0, "sft_steps": len(sft),
                            "sft_loss_last": sft[-1]["sft_loss"] if sft else None,
                            "sft_eval_accuracy": [[r["step"], r["sft_eval_accuracy"]] for r in sft
                                                  if "sft_eval_accuracy" in r],
                            "grpo_steps": len(grpo_rows)}
  result["grpo_curve"] = [{k: r[k] for k in keys if k in r} for r in grpo_rows]
  result["grpo_summary"] = curve_summary(grpo_rows)
  plot = rl_dir / "rl_plots.png"
  if plot.exists():
    shutil.copy(plot, out.with_name(out.stem + "_rewards.png"))
  write()

  t0 = time.perf_counter()
  tok = make_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
  ref = Checkpointer(rl_dir / "reference", keep=1, async_save=False)
  try:
    ref_params, _ = ref.restore(None, {"params": trainer.abstract_state(cfg)["params"]})
  finally:
    ref.close()
  after_model, _ = load_model(rl_dir)
  result["evaluation"] = {}
  for name, model in (("before_grpo", nnx.merge(trainer.graph_def(cfg), ref_params["params"])),
                      ("after_grpo", after_model)):
    ev = rl.evaluate(cfg, model, tok, args.eval_problems)
    result["evaluation"][name] = {**{k: v for k, v in ev.items() if k != "completions"},
                                  "samples": ev["completions"][:args.samples]}
    print(f"{name}: accuracy {ev['accuracy']:.3f}, format {ev['format_rate']:.3f}, "
          f"reward {ev['reward_mean']:.3f} on {args.eval_problems} held-out problems", flush=True)
  result["phases"]["evaluation"] = {"wall_s": time.perf_counter() - t0}
  write()
  s = result["grpo_summary"]
  print(f"GRPO training rollouts: reward {s['start']['reward_mean']} -> {s['end']['reward_mean']}, "
        f"accuracy {s['start']['accuracy']} -> {s['end']['accuracy']}; wrote {out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
