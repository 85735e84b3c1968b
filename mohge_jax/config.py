"""Typed configuration: dataclasses filled from YAML files and `key=value` overrides.

    cfg = load_config("configs/tiny.yaml", ["model.top_k=4", "train.steps=100"])

Every value is type-checked against its field annotation; unknown keys and values that
break the model's invariants raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
  """A configuration value is missing, unknown, of the wrong type or inconsistent."""


FFN_KINDS = ("mohge", "moe", "dense")
COMBINE_MODES = ("softmax", "renormalize", "raw")
EXPERT_BACKENDS = ("auto", "reference", "ragged_dot", "tiled", "pallas", "per_expert")
ATTENTION_KINDS = ("mla", "mha")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# sparse_attention.sparse_mla: pure JAX, the wgmma Mosaic GPU forward kernel, it interpreted
# (CPU tests); the same two for the 16-row MMA forward kernel, and with its backward kernel
DSA_IMPLS = ("auto", "reference", "pallas", "interpret", "pallas_mma", "interpret_mma",
             "pallas_mma_bwd", "interpret_mma_bwd")
DECODE_ATTENTION = ("auto", "xla", "pallas")
DECODE_ABSORB = ("none", "query", "output", "both")   # attention.ABSORB_FORMS
DECODE_GEMMS = ("xla", "splitk")
DSA_TOPK_METHODS = ("sort", "radix", "sample", "threshold", "fused")
ROPE_SCALINGS = ("none", "yarn")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_out", "save_dsa_selection")
DTYPES = ("float32", "bfloat16", "float16")
SPARSE_ATTENTION = ("none", "dsa")
DSA_STAGES = ("dense_warmup", "sparse")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder. Field letters: D model width, L layers, H heads, V vocabulary."""

  vocab_size: int = 257  # tokenizer's vocabulary; matrices are padded (vocab_pad_multiple)
  vocab_pad_multiple: int = 128
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  max_seq_len: int = 4096  # longest sequence the model accepts (RoPE tables)

  # Attention: "mla" (DeepSeek-V2 latent attention) or "mha" (multi-head, GQA via num_kv_heads).
  attention: str = "mla"
  attention_impl: str = "auto"  # auto (cuDNN flash on GPU, else XLA), xla or cudnn
  # Packed documents. false (the reference, Megatron's packing): positions 0..L-1, attention
  # across documents, every target scored. true: attention masked to each document,
  # positions restart after each separator, the separator's target not scored.
  doc_attention_mask: bool = False
  q_lora_rank: int = 0  # 0: no query compression (MoHGE-3B)
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  head_dim: int = 64  # mha only
  num_kv_heads: int = 0  # mha only; 0 means num_heads
  rope_theta: float = 10000.0
  rope_scaling: str = "none"  # "yarn": DeepSeek-V2's YaRN
  yarn_factor: float = 40.0
  yarn_original_max_len: int = 4096
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 0.707
  yarn_mscale_all_dim: float = 0.707

  # DeepSeek Sparse Attention (spec §2; MLA only): a lightning indexer scores every earlier
  # position, each query attends to its dsa_topk best (shared by all heads). The indexer:
  # dsa_index_heads x dsa_index_dim, RoPE on the first dsa_index_rope_dim dims. V3.2's
  # 64 x 128 is sized for 128 heads; for 16 heads 4 x 64 keeps it ~1/20 of attention.
  # The stage (dense warm-up or sparse) is train.dsa_stage.
  sparse_attention: str = "none"  # "none" or "dsa"
  dsa_index_heads: int = 4
  dsa_index_dim: int = 64
  dsa_index_rope_dim: int = 32
  dsa_topk: int = 2048
  # Queries per chunk of the indexer scores, the top-k and the sparse gather: memory is
  # O(chunk x (seq + topk x latent)) per sequence, never [seq, topk, latent].
  dsa_query_chunk: int = 256
  # The sparse attention's implementation (sparse_attention.sparse_mla): "reference" (pure
  # JAX), "pallas" (the wgmma Mosaic GPU forward kernel; Hopper), "pallas_mma" (the 16-row
  # MMA forward kernel: 16 heads, bf16; 2.2-3.3x pallas's speed on the H200),
  # "pallas_mma_bwd" (with its backward kernel too: fwd+bwd 2.3x pallas_mma's), "auto" (on
  # one Hopper GPU pallas_mma_bwd where its shapes qualify, else pallas where they do, else
  # reference); "interpret", "interpret_mma", "interpret_mma_bwd": the kernels in the GPU
  # interpreter (tests). Without _bwd the backward is pure JAX.
  dsa_impl: str = "reference"
  # How each query's top dsa_topk keys are found (sparse_attention.select_topk): "sort"
  # (jax.lax.top_k, which sorts every row at these k), "radix" (top_k_positions: the same
  # keys from a digit-by-digit search for the k-th score, no sort), "sample"
  # (top_k_sampled: top_k's result from ~2k candidates a row above a sampled threshold) or
  # "threshold" (top_k_threshold: radix's keys, the search run on those candidates only;
  # on the H200 the fastest of these four at 64k-128k) or "fused" (top_k_fused:
  # threshold's keys, the index scores and candidates from one GPU kernel that never
  # writes the scores out; the same in XLA off the GPU).
  dsa_topk_method: str = "sort"
  # Decode-time attention over the MLA cache (attention.MLA.decode, dense attention):
  # "xla" (two einsums: scores, then P x latent; the cache read twice), "pallas"
  # (pallas_kernels/mla_decode_gpu.py, one read of the cache; Hopper, 16 heads, bf16, a
  # cache length that is a multiple of 64: refused otherwise) or "auto": the kernel where it
  # applies and was measured faster on the H200 (batch >= 32: 1.6x xla at 256, 1.5x at 32;
  # 0.9x at batch 1), else xla.
  decode_attention: str = "auto"
  # Decode's Mosaic GPU kernels (the MLA decode kernel, the slot kernels of
  # decode_backend="capacity_kernel") launched with programmatic dependent launch: each may
  # start while the kernels before it finish, loading what they do not write (the expert
  # weights; the cache into L2) before it waits for them. Right on the H200 and no faster
  # (MoHGE-3B batch 256: 3.877/3.860 ms against 3.879/3.853; notes_generate.md): off.
  decode_pdl: bool = False
  # MLA's decode weights with W_UK and W_UV multiplied into the projections around them
  # (`MLA.decode_weights(absorb=)`, the unrolled decode step): "query" (x -> q_lat [H*C]
  # in one GEMM, where q_nope's GEMM and the per-head W_UK product were two launches and a
  # column copy), "output" (o_lat [H*C] -> the residual in one GEMM, for W_UV's product
  # and w_o), "both" or "none". More bytes (16 MB against 6 a projection at MoHGE-3B) in
  # fewer GEMMs; on the H200 no faster with XLA's GEMMs (MoHGE-3B batch 256: 3.360-3.367
  # ms a step against 3.345, twenty-fifth session): "none".
  decode_absorb: str = "none"
  # MLA decode's dense projections (x's inputs [B, D] x [D, N], the output [B, H*V] x w_o):
  # "xla" (jnp.dot: on the H200 XLA's split-K writes float32 partials and sums them in a
  # second launch) or "splitk" (pallas_kernels/splitk_gpu.py: one launch, the partials
  # summed in a thread-block cluster's shared memory; Hopper, bf16/f16, B a multiple of 64
  # up to 256, else XLA's). MoHGE-3B batch 256 on the H200: 3.803-3.815 ms a step with
  # splitk against 3.407 (twenty-fifth session): "xla".
  decode_gemm: str = "xla"

  # FFN per layer: the first `first_dense_layers` are dense, the others `ffn`.
  # `layer_ffn` (one entry per layer) overrides both when given.
  ffn: str = "mohge"
  first_dense_layers: int = 1
  layer_ffn: tuple[str, ...] = ()
  dense_ffn_width: int = 512

  # Routed experts: G groups (one width each, strictly increasing for mohge) x N experts.
  group_widths: tuple[int, ...] = (64, 96, 128, 160)
  experts_per_group: int = 4
  top_k_groups: int = 2  # Kg (mohge only)
  top_k: int = 3  # K
  combine_weights: str = "softmax"
  num_shared_experts: int = 2
  shared_expert_width: int = 64  # width of each shared expert (fused into one SwiGLU)
  expert_backend: str = "auto"

  norm_eps: float = 1e-6
  init_std: float = 0.008  # std of every weight matrix's normal init, but see the next line
  # Megatron's scaled init: the output projections that write into the residual stream
  # (attention w_o, every FFN's w_down: dense, shared and routed experts) get
  # init_std / sqrt(2 * num_layers), as the reference (0.008 / sqrt(30) for MoHGE-3B).
  scaled_output_init: bool = True
  dtype: str = "float32"  # compute dtype; parameters are float32
  # per layer: none, full, save_dots, save_attention_out, save_dsa_selection (as full but
  # the DSA top-k's selection kept: no second top-k in the backward pass; without a
  # selection, dense attention or DSA's warm-up, it is full, so one config serves all)
  remat: str = "none"
  # Run each stack of repeated layers as one jax.lax.scan over stacked parameters (compile
  # cost of one layer, not num_layers); false unrolls the same parameters in Python.
  scan_layers: bool = True

  @property
  def padded_vocab(self) -> int:
    m = self.vocab_pad_multiple
    return -(-self.vocab_size // m) * m

  @property
  def num_groups(self) -> int:
    return len(self.group_widths)

  @property
  def num_experts(self) -> int:
    return self.num_groups * self.experts_per_group

  @property
  def ffn_kinds(self) -> tuple[str, ...]:
    if self.layer_ffn:
      return tuple(self.layer_ffn)
    n_dense = min(self.first_dense_layers, self.num_layers)
    return ("dense",) * n_dense + (self.ffn,) * (self.num_layers - n_dense)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def output_init_std(self) -> float:
    """Init std of the residual-stream output projections (w_o, w_down)."""
    if self.scaled_output_init:
      return self.init_std / math.sqrt(2 * self.num_layers)
    return self.init_std


@dataclasses.dataclass(frozen=True)
class LossConfig:
  group_aux_coef: float = 1e-5  # alpha_g of the Group-Wise Auxiliary Loss
  group_aux_delta: float = 1024.0  # Delta: width interval of the size weights
  group_aux_start_step: int = -1  # -1: train.steps // 2, as the reference
  expert_aux_coef: float = 5e-3  # alpha of the Intra-Group loss (mohge) / Switch loss (moe)
  z_loss_coef: float = 0.0  # router z-loss, off by default
  # Scope of the auxiliary losses' statistics (mean router probabilities, token counts) of
  # the Group-Wise, Intra-Group and Switch losses. 0: the whole (micro-)batch. N > 0: each
  # consecutive chunk of N tokens of the flattened [B*L] token axis gets its own statistics
  # and loss, and the chunks' losses are averaged, whatever the device count. The
  # reference computes them per data-parallel rank and micro-batch: 4 x 4096 = 16384.
  aux_tokens: int = 0
  # DSA indexer KL loss (spec §2), summed over layers and averaged over scored positions.
  # Its gradient reaches only the indexer (the indexer's inputs and the attention target
  # are stop-gradient), so the coefficient only scales the indexer's learning rate.
  dsa_kl_coef: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # Comma-separated named corpora ("embedded": the stdlib's sources, "site-packages": the
  # installed packages' sources) and paths/globs (.txt, .jsonl, .parquet); or "tokens:DIR",
  # a directory of tokens written by `python -m mohge_jax.data export`.
  source: str = "embedded"
  tokenizer: str = "byte"  # "byte" or a Hugging Face tokenizers JSON file
  eos_token: str = ""  # separator token name for HF tokenizers without a known eos
  val_permille: int = 10
  cache_dir: str = ""  # "" means ~/.cache/mohge_jax/tokens


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 8  # global batch, sequences
  seq_len: int = 128
  grad_accum: int = 1
  logits_chunk: int = 0  # >0: compute the LM loss in chunks of this many positions
  lr: float = 3e-4
  min_lr: float = 3e-5
  warmup_steps: int = 10  # lr/W at step 0 ... lr at step W-1; 0: cosine from lr at step 0
  weight_decay: float = 0.1  # on matrices; never on norm scales
  decay_embedding: bool = False  # also decay the embedding table (Megatron, the reference)
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4
  ckpt_every: int = 100
  keep_checkpoints: int = 3
  # After SIGTERM/SIGINT the run checkpoints at the end of the current step and stops; if
  # it has not stopped this many seconds later (a step stuck in a collective, a hung
  # device), it exits without a checkpoint. A second signal exits at once.
  stop_grace_s: float = 600.0
  # false: no checkpoints at all (not every train.ckpt_every steps, nor at the end or on a
  # signal), so a run cannot be resumed: for measurements that only want the metrics.
  save_checkpoints: bool = True
  # XLA's persistent compilation cache: a repeated or resumed run skips XLA compilation
  # (not tracing or Pallas lowering). "" turns it off; JAX_COMPILATION_CACHE_DIR, when set,
  # takes precedence.
  compile_cache: str = "~/.cache/mohge_jax/xla"
  # With model.sparse_attention=dsa: "dense_warmup" (dense attention; only the indexer
  # trains, on the KL to the attention distribution; every other parameter frozen) or
  # "sparse" (top-k attention; everything trains; the KL restricted to the selected keys).
  dsa_stage: str = "sparse"
  # A workdir (or its checkpoints/ directory) whose newest checkpoint's parameters start a
  # new run (step 0, fresh optimizer state): parameters the checkpoint lacks (the DSA
  # indexer of a dense-trained model) keep their fresh initialisation. Ignored when the
  # run's own workdir has a checkpoint (that run resumes).
  init_from: str = ""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh: data x fsdp x expert x tensor must equal the device count (one -1 = rest).

  The batch is sharded over data, fsdp and expert; parameters over fsdp (and tensor);
  each group's experts over expert (the All-size Group-decoupling Allocation: with
  expert = experts_per_group every device holds one expert of every width).
  """

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  # "all_to_all" (ragged, dropless), "all_gather" (the group's tokens gathered, outputs
  # reduce-scattered) or "auto": all_gather while the expert axis is smaller than top_k
  # (it moves (EP-1)*T rows per rank, all_to_all ~K*T*(EP-1)/EP), else all_to_all.
  # Measured at EP 2 on two H200s (MoHGE-3B): all_gather 0.84-0.85x one GPU's tokens/s per
  # GPU, all_to_all 0.66x (benchmarks/notes_expert_parallel.md).
  expert_comm: str = "auto"
  placement: str = "all_size"  # "all_size" or "naive" (whole groups per rank: the contrast)
  # How XLA:GPU runs the ragged all-to-all (collectives.GPU_A2A_FLAGS; process-wide XLA
  # flags, set before the backend starts): "decomposed" (dense all-to-all of padded
  # slices), "nccl" (NCCL send/recv of the exact rows: no result in 120 s for 1.6 GB per
  # rank on 2 x H200, unusable at that size) or "one_shot" (XLA's default
  # kernel: 296 ms for 1.6 GB per rank on 2 x H200, 37x the decomposed form).
  gpu_a2a: str = "decomposed"


EXPERT_COMMS = ("auto", "all_to_all", "all_gather")
GPU_A2A_KINDS = ("decomposed", "nccl", "one_shot")  # collectives.GPU_A2A_FLAGS's keys
RL_TASKS = ("arithmetic", "countdown")
RL_REFERENCES = ("frozen",)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """GRPO (`python -m mohge_jax.rl`, spec §4): train.steps GRPO steps after rl.sft_steps
  supervised warm-up steps; the GRPO optimizer is train's (lr, schedule, clipping)."""

  # The task (mohge_jax.tasks) and its difficulty: arithmetic uses digits and ops,
  # countdown numbers and max_value.
  task: str = "arithmetic"
  digits: int = 1
  ops: str = "+-*"
  numbers: int = 3
  max_value: int = 10
  format_weight: float = 0.1  # reward bonus for <answer>...</answer> (tasks.reward)
  require_think: bool = False
  # Sampling: prompts_per_step prompts x group_size outputs each (G).
  prompts_per_step: int = 4
  group_size: int = 8
  max_new_tokens: int = 16
  temperature: float = 1.0  # > 0: the objective needs the sampler's log-probs
  top_p: float = 1.0
  top_k: int = 0
  prompt_bucket: int = 32  # prompts are right-padded to a multiple of this (fewer compiles)
  # The objective (grpo.grpo_loss) and V3.2's refinements.
  clip_eps: float = 0.2
  kl_coef: float = 0.04  # beta
  unbiased_kl: bool = True
  offpolicy_masking: bool = True
  offpolicy_delta: float = 0.5
  keep_sampling_mask: bool = True
  keep_routing: bool = True
  updates_per_step: int = 1  # optimizer updates on each step's rollouts
  # The reference policy of the KL: "frozen" = the policy as GRPO starts (after the SFT
  # warm-up), saved once to WORKDIR/reference.
  reference: str = "frozen"
  # SFT warm-up on the task's format: prompt + "<answer>ANSWER</answer>" + end-of-text,
  # loss on the answer tokens only.
  sft_steps: int = 0
  sft_batch_size: int = 16
  sft_lr: float = 1e-3
  # SFT ends early (GRPO starts at step rl.sft_steps) once the greedy accuracy on
  # rl.sft_eval_problems held-out problems, checked every rl.sft_eval_every SFT steps,
  # reaches rl.sft_stop_accuracy: GRPO starts from a policy that partly solves the task.
  # 0: off (all rl.sft_steps steps).
  sft_stop_accuracy: float = 0.0
  sft_eval_every: int = 50
  sft_eval_problems: int = 128


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  loss: LossConfig = LossConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  rl: RLConfig = RLConfig()

  @property
  def group_aux_start(self) -> int:
    s = self.loss.group_aux_start_step
    return self.train.steps // 2 if s < 0 else s

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
  """Checks `value` against annotation `tp`; ints are accepted for floats, lists for tuples."""
  origin = typing.get_origin(tp)
  if origin is tuple:
    (item_tp, _) = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
    return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
  if tp is float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value
  raise TypeError(f"unsupported annotation {tp} for {where}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
  if not isinstance(values, dict):
    raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(
        f"unknown key(s) {', '.join(repr(f'{where}{k}') for k in unknown)}; "
        f"valid keys of {where.rstrip('.') or 'the config'}: {', '.join(fields)}")
  kwargs = {}
  for name, value in values.items():
    tp = hints[name]
    if dataclasses.is_dataclass(tp):
      kwargs[name] = _build(tp, value, f"{where}{name}.")
    else:
      kwargs[name] = _coerce(value, tp, f"{where}{name}")
  return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    tree = tree.setdefault(p, {})
    if not isinstance(tree, dict):
      raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
  tree[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"override {item!r} is not of the form section.key=value")
    _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
  return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for k, v in extra.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def from_dict(values: dict[str, Any]) -> Config:
  cfg = _build(Config, values, "")
  validate(cfg)
  return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
  values: dict[str, Any] = {}
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise ConfigError(f"config file {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
  return from_dict(_merge(values, parse_overrides(overrides or [])))


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
  """Returns cfg with some fields of some sections replaced, validated again."""
  return from_dict(_merge(cfg.to_dict(), sections))


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def _one_of(value: str, options: tuple[str, ...], where: str) -> None:
  _require(value in options, f"{where}={value!r}: must be one of {', '.join(options)}")


def validate(cfg: Config) -> None:
  m, lo, t = cfg.model, cfg.loss, cfg.train
  for name in ("vocab_size", "vocab_pad_multiple", "d_model", "num_layers", "num_heads",
               "max_seq_len", "experts_per_group", "top_k"):
    _require(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)}: must be >= 1")
  _one_of(m.attention, ATTENTION_KINDS, "model.attention")
  _one_of(m.attention_impl, ATTENTION_IMPLS, "model.attention_impl")
  _one_of(m.rope_scaling, ROPE_SCALINGS, "model.rope_scaling")
  _one_of(m.ffn, FFN_KINDS, "model.ffn")
  _one_of(m.combine_weights, COMBINE_MODES, "model.combine_weights")
  _one_of(m.expert_backend, EXPERT_BACKENDS, "model.expert_backend")
  _one_of(m.dtype, DTYPES, "model.dtype")
  _one_of(m.remat, REMAT_POLICIES, "model.remat")
  _one_of(m.sparse_attention, SPARSE_ATTENTION, "model.sparse_attention")
  _one_of(t.dsa_stage, DSA_STAGES, "train.dsa_stage")
  _one_of(m.dsa_impl, DSA_IMPLS, "model.dsa_impl")
  _one_of(m.dsa_topk_method, DSA_TOPK_METHODS, "model.dsa_topk_method")
  _one_of(m.decode_attention, DECODE_ATTENTION, "model.decode_attention")
  _one_of(m.decode_absorb, DECODE_ABSORB, "model.decode_absorb")
  _one_of(m.decode_gemm, DECODE_GEMMS, "model.decode_gemm")
  if m.decode_attention == "pallas":
    from pallas_kernels import mla_decode_gpu  # noqa: PLC0415 - only for this check
    _require(m.attention == "mla" and m.sparse_attention != "dsa",
             "model.decode_attention=pallas is the dense MLA decode kernel: it needs "
             f"model.attention=mla without sparse attention (got {m.attention!r}, "
             f"sparse_attention={m.sparse_attention!r})")
    reason = mla_decode_gpu.unsupported_reason(m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim,
                                               64, m.dtype)
    _require(reason is None, f"model.decode_attention=pallas: {reason}")
  if m.sparse_attention == "dsa":
    _require(m.attention == "mla",
             f"model.sparse_attention=dsa needs model.attention=mla (got {m.attention!r}): "
             "the sparse path attends in MLA's latent form")
    if "_mma" in m.dsa_impl:  # the 16-row MMA kernels take fewer shapes than the rest
      from pallas_kernels import sparse_mla_mma_gpu  # noqa: PLC0415 - only for this check
      reason = sparse_mla_mma_gpu.unsupported_reason(
          m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.dsa_topk, m.dtype)
      _require(reason is None, f"model.dsa_impl={m.dsa_impl}: {reason}")
    for name in ("dsa_index_heads", "dsa_index_dim", "dsa_topk", "dsa_query_chunk"):
      _require(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)}: must be >= 1")
    if m.dsa_topk_method == "fused" and m.dsa_index_dim >= 1:
      from pallas_kernels import indexer_gpu  # noqa: PLC0415 - only for this check
      reason = indexer_gpu.unsupported_reason(m.dsa_index_dim)
      _require(reason is None, f"model.dsa_topk_method=fused with model.dsa_index_dim="
               f"{m.dsa_index_dim}: {reason}")
    _require(m.dsa_index_rope_dim % 2 == 0 and 0 <= m.dsa_index_rope_dim <= m.dsa_index_dim,
             f"model.dsa_index_rope_dim={m.dsa_index_rope_dim}: must be even and between 0 "
             f"and model.dsa_index_dim={m.dsa_index_dim}")
  _require(lo.dsa_kl_coef >= 0, f"loss.dsa_kl_coef={lo.dsa_kl_coef}: must be >= 0")
  for i, kind in enumerate(m.layer_ffn):
    _one_of(kind, FFN_KINDS, f"model.layer_ffn[{i}]")
  _require(not m.layer_ffn or len(m.layer_ffn) == m.num_layers,
           f"model.layer_ffn has {len(m.layer_ffn)} entries; model.num_layers={m.num_layers}")
  _require(m.first_dense_layers >= 0, "model.first_dense_layers must be >= 0")
  if m.attention == "mla":
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      _require(getattr(m, name) >= 1, f"model.{name} must be >= 1 for MLA")
    _require(m.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim must be even (RoPE pairs)")
    _require(m.q_lora_rank >= 0, "model.q_lora_rank must be >= 0 (0: no query compression)")
  else:
    _require(m.head_dim >= 2 and m.head_dim % 2 == 0, "model.head_dim must be even and >= 2")
    _require(m.num_heads % m.kv_heads == 0,
             f"model.num_kv_heads={m.kv_heads} must divide model.num_heads={m.num_heads}")
  kinds = m.ffn_kinds
  if "dense" in kinds:
    _require(m.dense_ffn_width >= 1, "model.dense_ffn_width must be >= 1")
  if "mohge" in kinds or "moe" in kinds:
    g, n = m.num_groups, m.experts_per_group
    _require(g >= 1, "model.group_widths must list at least one width")
    _require(all(w >= 1 for w in m.group_widths), "model.group_widths must be positive")
    _require(m.num_shared_experts >= 0, "model.num_shared_experts must be >= 0")
    _require(m.num_shared_experts == 0 or m.shared_expert_width >= 1,
             "model.shared_expert_width must be >= 1 when there are shared experts")
  if "mohge" in kinds:
    widths = m.group_widths
    _require(all(a < b for a, b in zip(widths, widths[1:])),
             f"model.group_widths={list(widths)}: widths must be strictly increasing")
    _require(1 <= m.top_k_groups <= g,
             f"model.top_k_groups={m.top_k_groups}: must be between 1 and the number of "
             f"groups G={g}")
    _require(m.top_k <= m.top_k_groups * n,
             f"model.top_k={m.top_k}: must be <= top_k_groups*experts_per_group = "
             f"{m.top_k_groups}*{n} = {m.top_k_groups * n}")
  if "moe" in kinds:
    _require(len(set(m.group_widths)) == 1,
             f"model.group_widths={list(m.group_widths)}: a homogeneous 'moe' layer needs "
             "all widths equal (usually one group)")
    _require(m.top_k <= m.num_experts,
             f"model.top_k={m.top_k}: must be <= the number of experts {m.num_experts}")
  _require(lo.group_aux_delta > 0, "loss.group_aux_delta must be > 0")
  for name in ("group_aux_coef", "expert_aux_coef", "z_loss_coef"):
    _require(getattr(lo, name) >= 0, f"loss.{name} must be >= 0")
  _require(lo.aux_tokens >= 0, f"loss.aux_tokens={lo.aux_tokens}: must be >= 0 (0: whole batch)")
  micro_tokens = t.batch_size // max(t.grad_accum, 1) * t.seq_len
  _require(lo.aux_tokens == 0 or micro_tokens % lo.aux_tokens == 0,
           f"loss.aux_tokens={lo.aux_tokens} must divide the tokens of a micro-batch, "
           f"train.batch_size/train.grad_accum x train.seq_len = {micro_tokens}")
  for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
               "ckpt_every", "keep_checkpoints"):
    _require(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)}: must be >= 1")
  _require(t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
  _require(t.stop_grace_s > 0, f"train.stop_grace_s={t.stop_grace_s}: must be > 0 (seconds)")
  _require(t.logits_chunk >= 0, "train.logits_chunk must be >= 0 (0: off)")
  _require(t.eval_batches >= 0, "train.eval_batches must be >= 0")
  _require(t.batch_size % t.grad_accum == 0,
           f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
  _require(t.seq_len <= m.max_seq_len,
           f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  _require(0 < t.min_lr <= t.lr or t.min_lr == 0, "train.min_lr must be in [0, train.lr]")
  _require(math.isfinite(t.lr) and t.lr > 0, "train.lr must be > 0")
  _require(0 <= cfg.data.val_permille < 1000, "data.val_permille must be in [0, 1000)")
  mesh = cfg.mesh
  sizes = {k: getattr(mesh, k) for k in ("data", "fsdp", "expert", "tensor")}
  for k, v in sizes.items():
    _require(v >= 1 or v == -1, f"mesh.{k}={v}: must be >= 1, or -1 for the remaining devices")
  _require(list(sizes.values()).count(-1) <= 1, "mesh: at most one axis may be -1")
  _one_of(mesh.expert_comm, EXPERT_COMMS, "mesh.expert_comm")
  _one_of(mesh.placement, ("all_size", "naive"), "mesh.placement")
  _one_of(mesh.gpu_a2a, GPU_A2A_KINDS, "mesh.gpu_a2a")
  if mesh.expert > 1 and any(k in ("mohge", "moe") for k in kinds):
    _require(m.expert_backend != "per_expert",
             "model.expert_backend=per_expert (the one-expert-at-a-time contrast) does not run "
             "under expert parallelism (mesh.expert > 1); use auto, pallas or tiled")
    if mesh.placement == "all_size":
      _require(m.experts_per_group % mesh.expert == 0,
               f"mesh.expert={mesh.expert} must divide model.experts_per_group="
               f"{m.experts_per_group}: each group's experts are split evenly over the "
               "expert axis (All-size allocation)")
    else:
      _require(m.num_groups % mesh.expert == 0,
               f"mesh.expert={mesh.expert} must divide the number of groups "
               f"{m.num_groups} for mesh.placement='naive' (whole groups per rank)")
  validate_rl(cfg.rl)


def validate_rl(r: RLConfig) -> None:
  _one_of(r.task, RL_TASKS, "rl.task")
  _one_of(r.reference, RL_REFERENCES, "rl.reference")
  for name in ("digits", "numbers", "max_value", "prompts_per_step", "group_size",
               "max_new_tokens", "prompt_bucket", "updates_per_step", "sft_batch_size",
               "sft_eval_every", "sft_eval_problems"):
    _require(getattr(r, name) >= 1, f"rl.{name}={getattr(r, name)}: must be >= 1")
  _require(r.numbers >= 2, f"rl.numbers={r.numbers}: countdown needs at least 2 numbers")
  _require(r.ops != "" and set(r.ops) <= set("+-*"),
           f"rl.ops={r.ops!r}: one or more of + - *")
  _require(r.group_size >= 2, f"rl.group_size={r.group_size}: GRPO needs >= 2 outputs per "
           "prompt (one output has zero advantage)")
  _require(math.isfinite(r.temperature) and r.temperature > 0,
           f"rl.temperature={r.temperature}: must be > 0 (greedy sampling has no log-probs "
           "for the importance ratio)")
  _require(0 < r.top_p <= 1, f"rl.top_p={r.top_p}: must be in (0, 1]")
  _require(r.top_k >= 0, f"rl.top_k={r.top_k}: must be >= 0 (0: off)")
  _require(0 < r.clip_eps < 1, f"rl.clip_eps={r.clip_eps}: must be in (0, 1)")
  _require(r.kl_coef >= 0, f"rl.kl_coef={r.kl_coef}: must be >= 0")
  _require(r.offpolicy_delta >= 0, f"rl.offpolicy_delta={r.offpolicy_delta}: must be >= 0")
  _require(r.format_weight >= 0, f"rl.format_weight={r.format_weight}: must be >= 0")
  _require(r.sft_steps >= 0, f"rl.sft_steps={r.sft_steps}: must be >= 0")
  _require(math.isfinite(r.sft_lr) and r.sft_lr > 0, f"rl.sft_lr={r.sft_lr}: must be > 0")
  _require(0 <= r.sft_stop_accuracy <= 1,
           f"rl.sft_stop_accuracy={r.sft_stop_accuracy}: must be in [0, 1] (0: off)")
