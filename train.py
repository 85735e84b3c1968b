"""Train a MoHGE (or MoE, or dense) language model.

    python train.py --config configs/tiny.yaml [--workdir DIR] [--steps N] [key=value ...]

Overrides are `section.key=value` (sections: model, loss, data, train, mesh), e.g.
`train.lr=1e-3 model.top_k=4 data.source=~/corpus/*.jsonl data.tokenizer=tokenizer.json
mesh.expert=8`. Multi-host launches (SLURM, TPU pods, JAX_COORDINATOR_ADDRESS/
JAX_NUM_PROCESSES/JAX_PROCESS_ID) initialise jax.distributed automatically.
Re-running the same command resumes from the latest intact checkpoint in the workdir
(damaged ones are reported and moved aside; `python -m mohge_jax.checkpoint verify WORKDIR`).
SIGTERM or Ctrl-C saves a checkpoint and stops; a second signal, or a run still not stopped
train.stop_grace_s seconds after the first (a stuck step), exits at once without one.
Start-up: the run prints the time to its first step (lowering, compilation, first step);
XLA's persistent compilation cache (train.compile_cache, default ~/.cache/mohge_jax/xla;
"" turns it off) lets a repeated or resumed run skip compilation.

Writes to the workdir: checkpoints/ (orbax, last train.keep_checkpoints kept),
metrics.jsonl (one JSON object per logged step), tb/ (TensorBoard), config.yaml (the
resolved config), summary.json. Plot with `python -m mohge_jax.plot WORKDIR`; export with
`python -m mohge_jax.export WORKDIR OUT`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="YAML config file (see configs/)")
  p.add_argument("--workdir", default=None,
                 help="where checkpoints and metrics go (default: runs/<config name>)")
  p.add_argument("--steps", type=int, default=None, help="total training steps (train.steps)")
  p.add_argument("overrides", nargs="*", metavar="section.key=value",
                 help="config overrides, e.g. train.lr=1e-3 model.top_k=4")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from mohge_jax.checkpoint import CheckpointError
  from mohge_jax.config import ConfigError, load_config
  from mohge_jax.trainer import TrainingError, train

  overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
  workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
  try:
    from mohge_jax import collectives, distributed
    cfg = load_config(args.config, overrides)
    collectives.use_gpu_a2a(cfg.mesh.gpu_a2a)  # XLA flags: before the backend starts
    distributed.maybe_initialize()  # multi-host launches (env vars, SLURM, TPU pods)
    result = train(cfg, workdir)
  except (ConfigError, TrainingError, CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0 if result.step >= cfg.train.steps or result.stopped_by_signal else 1


if __name__ == "__main__":
  sys.exit(main())
