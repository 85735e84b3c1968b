"""DSA's two-stage training, short: the indexer's KL during the dense warm-up, and the LM
loss of sparse training against dense training from the same weights on the same batches.

    python -m benchmarks.dsa_two_stage [--config configs/tiny.yaml] [--dense-steps 300]
        [--warmup-steps 100] [--stage-steps 200] [--seq 256] [--topk 32]
        [--run-dir runs/dsa_two_stage] [--out benchmarks/results/dsa_two_stage_cpu.json]
        [section.key=value ...]

Four `train.py` runs, each in its own process (the overrides go to all four):
1. `dense`: the config as it is, --dense-steps steps;
2. `warmup`: `model.sparse_attention=dsa train.dsa_stage=dense_warmup`, from `dense`
   (`train.init_from`; the indexer starts fresh), --warmup-steps steps: dense attention,
   only the indexer trains, on its KL to the attention distribution;
3. `sparse`: `train.dsa_stage=sparse` from `warmup`, --stage-steps steps: each query
   attends to its --topk keys, everything trains;
4. `dense_more`: dense attention from `dense`, --stage-steps steps.

`sparse` and `dense_more` start from the same main weights (the warm-up changes only the
indexer) and see the same batches (a batch is a function of (train.seed, step), and both
start at step 0), so their losses compare the attention alone. Writes --out: each run's
curve (LM loss and, for DSA, the KL, per logged step; validation loss), the KL at the start
and end of the warm-up, and the final LM and validation losses of `sparse` and `dense_more`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _window_mean(rows: list[dict], key: str, first: bool) -> float | None:
  vals = [r[key] for r in rows if key in r]
  if not vals:
    return None
  n = max(1, len(vals) // 5)
  part = vals[:n] if first else vals[-n:]
  return sum(part) / len(part)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/tiny.yaml")
  ap.add_argument("--dense-steps", type=int, default=300)
  ap.add_argument("--warmup-steps", type=int, default=100)
  ap.add_argument("--stage-steps", type=int, default=200)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--topk", type=int, default=32)
  ap.add_argument("--run-dir", default="runs/dsa_two_stage")
  ap.add_argument("--out", default="benchmarks/results/dsa_two_stage_cpu.json")
  ap.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = ap.parse_args(argv)
  if args.topk >= args.seq:
    raise SystemExit(f"--topk {args.topk} >= --seq {args.seq}: sparse attention would be dense")

  run_dir = Path(args.run_dir)
  common = [f"train.seq_len={args.seq}", "train.log_every=10", "train.save_checkpoints=true",
            *args.overrides]  # the user's overrides win
  dsa = ["model.sparse_attention=dsa", f"model.dsa_topk={args.topk}"]
  runs = [
      ("dense", args.dense_steps, []),
      ("warmup", args.warmup_steps,
       dsa + ["train.dsa_stage=dense_warmup", f"train.init_from={run_dir / 'dense'}"]),
      ("sparse", args.stage_steps,
       dsa + ["train.dsa_stage=sparse", f"train.init_from={run_dir / 'warmup'}"]),
      ("dense_more", args.stage_steps, [f"train.init_from={run_dir / 'dense'}"]),
  ]
  result = {"what": "DSA two-stage training (benchmarks/dsa_two_stage.py)",
            "command": " ".join(["python -m benchmarks.dsa_two_stage",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.date.today().isoformat(), "config": args.config,
            "seq": args.seq, "topk": args.topk, "runs": {}}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  for name, steps, extra in runs:
    workdir = run_dir / name
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", args.config, "--workdir",
           str(workdir), *common, *extra, f"train.steps={steps}"]
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
      raise SystemExit(f"{name} failed: see {workdir}")
    rows = _rows(workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    result["runs"][name] = {
        "steps": steps, "overrides": extra, "val_loss": summary.get("val_loss"),
        "curve": [{k: r[k] for k in ("step", "lm_loss", "dsa_kl", "val_loss") if k in r}
                  for r in rows]}
    out.write_text(json.dumps(result, indent=1) + "\n")

  warm, sparse, dense = (_rows(run_dir / n) for n in ("warmup", "sparse", "dense_more"))
  result["summary"] = {
      "warmup_kl_first_fifth": _window_mean(warm, "dsa_kl", True),
      "warmup_kl_last_fifth": _window_mean(warm, "dsa_kl", False),
      "sparse_lm_loss_last_fifth": _window_mean(sparse, "lm_loss", False),
      "dense_lm_loss_last_fifth": _window_mean(dense, "lm_loss", False),
      "sparse_val_loss": result["runs"]["sparse"]["val_loss"],
      "dense_val_loss": result["runs"]["dense_more"]["val_loss"]}
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(json.dumps(result["summary"], indent=1), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
