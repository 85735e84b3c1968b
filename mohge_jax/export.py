"""Export trained parameters: `python -m mohge_jax.export WORKDIR OUT [--dtype bf16|f32]`.

Writes OUT/model.safetensors (parameters only, one tensor per layer, named like
`blocks.1.ffn.w_gate_up.0`, whatever stacks the model scans) and OUT/config.json (the
model's full config, and under "checksums" the size and sha256 of model.safetensors,
checked by `load`). Load back for inference with

    model, cfg = mohge_jax.export.load("OUT")
    logits, _ = model(tokens_BxL)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.flax import load_file, save_file

from mohge_jax import integrity
from mohge_jax.checkpoint import Checkpointer, CheckpointError
from mohge_jax.config import Config, from_dict
from mohge_jax.model import Transformer, layer_runs
from mohge_jax.trainer import abstract_state

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def _name(path: tuple) -> str:
  return ".".join(str(k) for k in path)


def _layer_names(path: tuple, first_layer: list[int]) -> tuple[int, str] | None:
  """A stacked parameter's path `stacks.<s>.layers.<rest>` -> (its stack's first layer,
  `<rest>`); None for parameters outside the stacks."""
  if str(path[0]) != "stacks":
    return None
  return first_layer[int(path[1])], _name(path[3:])


def _first_layers(cfg: Config) -> list[int]:
  sizes = [n for _, n in layer_runs(cfg.model.ffn_kinds)]
  return [sum(sizes[:i]) for i in range(len(sizes))]


def params_to_flat(params: nnx.State, cfg: Config, dtype) -> dict[str, jax.Array]:
  """Named tensors, the stacked layers split into one tensor per layer (`blocks.<i>.…`)."""
  first_layer = _first_layers(cfg)
  flat = {}
  for path, v in nnx.to_flat_state(params):
    value = jnp.asarray(v[...] if hasattr(v, "get_value") else v, dtype)
    stacked = _layer_names(path, first_layer)
    if stacked is None:
      flat[_name(path)] = value
    else:
      first, rest = stacked
      for i in range(value.shape[0]):
        flat[f"blocks.{first + i}.{rest}"] = value[i]
  return flat


def export_params(params: nnx.State, cfg: Config, out: str | Path, dtype: str = "bf16") -> Path:
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  flat = params_to_flat(params, cfg, DTYPES[dtype])
  save_file(flat, str(out / "model.safetensors"), metadata={"format": "mohge_jax", "dtype": dtype})
  # Written last: a crash while writing the tensors leaves a mismatch that load() reports.
  config = {**cfg.to_dict(), "checksums": _checksums(out, ["model.safetensors"])}
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  return out


def _checksums(out: Path, names: list[str]) -> dict[str, dict]:
  return {n: {"bytes": (out / n).stat().st_size, "sha256": integrity.file_sha256(out / n)}
          for n in names}


def _verify_checksums(path: Path, checksums: dict | None) -> None:
  """Raises ValueError naming the file whose size or sha256 differs from config.json's."""
  if not isinstance(checksums, dict) or not checksums:
    raise ValueError(f"{path / 'config.json'} has no checksums, so {path} cannot be verified "
                     "(exported by an older version?): export it again")
  for name, want in checksums.items():
    got = _checksums(path, [name])[name]
    if got != want:
      what = (f"{got['bytes']:,} bytes, {want['bytes']:,} written" if got["bytes"] != want["bytes"]
              else "sha256 mismatch")
      raise ValueError(f"{path / name} is damaged: it is not the file that was exported "
                       f"({what}); export it again")


def restore_params(workdir: str | Path, step: int | None = None) -> tuple[nnx.State, Config]:
  """(parameters, config) of a training workdir's checkpoint `step` (default: the latest
  complete one)."""
  ckpt_dir = Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise CheckpointError(f"no checkpoints in {workdir} (expected {ckpt_dir})")
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
    cfg = from_dict(ckpt.restore_meta(step)["config"])
    state, _ = ckpt.restore(step, abstract_state(cfg))
  finally:
    ckpt.close()
  return state["params"], cfg


def export_workdir(workdir: str | Path, out: str | Path, *, dtype: str = "bf16",
                   step: int | None = None) -> Path:
  params, cfg = restore_params(workdir, step)
  return export_params(params, cfg, out, dtype)


def load(path: str | Path, *, dtype=jnp.float32) -> tuple[Transformer, Config]:
  """Builds the model from OUT/config.json and fills it from OUT/model.safetensors."""
  path = Path(path)
  for f in ("config.json", "model.safetensors"):
    if not (path / f).is_file():
      raise FileNotFoundError(f"{path / f} does not exist: not an exported model directory")
  try:
    config = json.loads((path / "config.json").read_text())
  except ValueError as e:  # includes UnicodeDecodeError
    raise ValueError(f"{path / 'config.json'} is damaged: not JSON ({e})") from None
  _verify_checksums(path, config.pop("checksums", None))
  cfg = from_dict(config)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)
  tensors = load_file(str(path / "model.safetensors"))
  first_layer = _first_layers(cfg)

  def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"{path}/model.safetensors lacks parameter {name}")
    if tuple(tensors[name].shape) != shape:
      raise ValueError(f"parameter {name}: file shape {tuple(tensors[name].shape)}, "
                       f"model shape {shape}")
    return tensors[name]

  flat = []
  for p, v in nnx.to_flat_state(abstract):
    stacked = _layer_names(p, first_layer)
    if stacked is None:
      value = tensor(_name(p), tuple(v.shape))
    else:
      first, rest = stacked
      value = np.stack([tensor(f"blocks.{first + i}.{rest}", tuple(v.shape[1:]))
                        for i in range(v.shape[0])])
    flat.append((p, v.replace(jnp.asarray(value, dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir")
  p.add_argument("out")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  args = p.parse_args(argv)
  try:
    out = export_workdir(args.workdir, args.out, dtype=args.dtype, step=args.step)
  except (CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(int(np.prod(t.shape)) for t in load_file(str(out / "model.safetensors")).values())
  print(f"exported {n:,} parameters ({args.dtype}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
