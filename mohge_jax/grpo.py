"""GRPO's objective (DeepSeekMath, R1) with DeepSeek-V3.2's refinements (spec §4).

    out = generate.generate(model, prompts, lens, key, ..., record_routes=True)
    batch = completion_batch(prompts, lens, out)            # sequences, masks, old log-probs
    logp = policy_logprobs(model, batch, keep_sampling_mask=True, keep_routing=True)
    loss, metrics = grpo_loss(logp, batch.old_logprobs, ref_logp, advantages, batch.loss_mask)

Letters: B sequences (prompts x group), L sequence length, T = L - 1 predicted tokens
(target t is token t + 1 of the sequence), V padded vocabulary.

The refinements, each switchable:
- unbiased KL: each token's k3 term pi_ref/pi - log(pi_ref/pi) - 1 is weighted by the
  ratio pi/pi_old, an importance-sampling correction for tokens drawn from pi_old;
- off-policy sequence masking: a sequence with negative advantage whose mean
  log(pi_old/pi) over its tokens exceeds `offpolicy_delta` loses its policy term;
- keep sampling mask: pi's log-probs normalised over the vocabulary entries the sampler
  allowed (its top-k/top-p set), at the sampler's temperature;
- keep routing: the training forward pass replays the experts chosen at sampling
  (`Transformer(..., forced=...)`), with combine weights from the live router.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mohge_jax import routing
from mohge_jax.generate import Generated, sequences


def group_advantages(rewards_PxG: jax.Array, eps: float = 1e-6) -> jax.Array:
  """A = (r - mean(r)) / (std(r) + eps) within each group of G outputs of one prompt (the
  population std). A group of equal rewards has zero advantage."""
  r = jnp.asarray(rewards_PxG, jnp.float32)
  return (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + eps)


def token_logprobs(logits_BxTxV: jax.Array, targets_BxT: jax.Array, *, temperature: float = 1.0,
                   allowed_BxTxV: jax.Array | None = None) -> jax.Array:
  """log pi(target) in float32 under softmax(logits / temperature), normalised over
  `allowed` entries only when given (keep sampling mask). A target outside `allowed` gets
  -inf, so use it only where the sampler drew the targets (the loss mask)."""
  x = logits_BxTxV.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
  if allowed_BxTxV is not None:
    x = jnp.where(allowed_BxTxV, x, -jnp.inf)
  logp_BxTxV = jax.nn.log_softmax(x, axis=-1)
  return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "loss_mask", "old_logprobs", "allowed", "routes"],
                   meta_fields=["temperature"])
@dataclasses.dataclass
class Rollouts:
  """Sampled sequences laid out for the training forward pass.

  tokens: [B, L] int32 prompt then completion, right-padded (generate.sequences).
  loss_mask: [B, T] bool, target t (token t + 1) is a sampled completion token.
  old_logprobs: [B, T] float32 the sampler's log-probs of those tokens (0 elsewhere).
  allowed: [B, T, V] bool the sampler's allowed set per completion target (all True
    elsewhere, so those rows stay finite); None when generated with return_mask=False.
  routes: routing.Forced over [R, B, L, ...] or None.
  """
  tokens: jax.Array
  loss_mask: jax.Array
  old_logprobs: jax.Array
  allowed: jax.Array | None
  routes: routing.Forced | None
  temperature: float = 1.0


def completion_batch(prompts_BxP, lengths_B, out: Generated, *,
                     temperature: float = 1.0) -> Rollouts:
  """Scatters generate's per-step outputs to the positions of each row's sequence."""
  tokens_BxL = sequences(prompts_BxP, lengths_B, out)
  B, L = tokens_BxL.shape
  lengths_B, gen_B = np.asarray(lengths_B), np.asarray(out.lengths)
  logp_BxN = np.asarray(out.logprobs)
  with_mask = out.sampling_mask is not None
  if with_mask:
    allowed_BxNxV = np.asarray(out.sampling_mask)
    allowed = np.ones((B, L - 1, allowed_BxNxV.shape[-1]), bool)
  mask = np.zeros((B, L - 1), bool)
  old = np.zeros((B, L - 1), np.float32)
  for b in range(B):
    t0, n = lengths_B[b] - 1, gen_B[b]  # target t0 + i is generated token i
    mask[b, t0:t0 + n] = True
    old[b, t0:t0 + n] = logp_BxN[b, :n]
    if with_mask:
      allowed[b, t0:t0 + n] = allowed_BxNxV[b, :n]
  return Rollouts(jnp.asarray(tokens_BxL), jnp.asarray(mask), jnp.asarray(old),
                  jnp.asarray(allowed) if with_mask else None, out.routes, float(temperature))


def policy_logprobs(model, batch: Rollouts, *, keep_sampling_mask: bool = True,
                    keep_routing: bool = True) -> jax.Array:
  """The policy's log-probs [B, T] of each sequence's next tokens (differentiable)."""
  forced = batch.routes if keep_routing else None
  if keep_sampling_mask and batch.allowed is None:
    raise ValueError("keep_sampling_mask needs the sampling mask (generate(return_mask=True))")
  if keep_routing and forced is None:
    raise ValueError("keep_routing needs routes recorded at sampling (record_routes=True)")
  logits_BxLxV, _ = model(batch.tokens, forced=forced)
  return token_logprobs(logits_BxLxV[:, :-1], batch.tokens[:, 1:],
                        temperature=batch.temperature,
                        allowed_BxTxV=batch.allowed if keep_sampling_mask else None)


def grpo_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, ref_logp_BxT: jax.Array,
              advantages_B: jax.Array, mask_BxT: jax.Array, *, clip_eps: float = 0.2,
              beta: float = 0.04, unbiased_kl: bool = True,
              offpolicy_delta: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Minus the GRPO objective: per token min(rho A, clip(rho, 1 - eps, 1 + eps) A)
  - beta KL, averaged over each sequence's masked tokens, then over sequences.

  rho = pi / pi_old; KL is k3 = pi_ref/pi - log(pi_ref/pi) - 1, times rho when
  `unbiased_kl` (the ratio is not detached: its gradient is the estimator's).
  `offpolicy_delta`: sequences with A < 0 and mean log(pi_old / pi) > delta (a detached
  statistic over their masked tokens) keep their KL term but lose their policy term.
  """
  m = mask_BxT.astype(jnp.float32)
  A_Bx1 = jnp.asarray(advantages_B, jnp.float32)[:, None]
  log_ratio = jnp.where(mask_BxT, logp_BxT - old_logp_BxT, 0.0)
  rho = jnp.exp(log_ratio)
  pg = jnp.minimum(rho * A_Bx1, jnp.clip(rho, 1 - clip_eps, 1 + clip_eps) * A_Bx1)
  ref_log_ratio = jnp.where(mask_BxT, ref_logp_BxT - logp_BxT, 0.0)
  kl = jnp.exp(ref_log_ratio) - ref_log_ratio - 1
  if unbiased_kl:
    kl = rho * kl
  n_B = jnp.maximum(m.sum(-1), 1.0)
  keep_B = jnp.ones(A_Bx1.shape[0], jnp.float32)
  offpolicy_kl_B = jax.lax.stop_gradient(-(log_ratio * m).sum(-1) / n_B)
  if offpolicy_delta is not None:
    keep_B = jnp.where((A_Bx1[:, 0] < 0) & (offpolicy_kl_B > offpolicy_delta), 0.0, 1.0)
  per_token = keep_B[:, None] * pg - beta * kl
  objective = jnp.mean((per_token * m).sum(-1) / n_B)
  clipped = (jnp.abs(rho - 1) > clip_eps) & mask_BxT
  metrics = {"kl": jnp.mean((kl * m).sum(-1) / n_B),
             "clip_fraction": clipped.sum() / jnp.maximum(m.sum(), 1.0),
             "masked_sequences": jnp.sum(1.0 - keep_B),
             "offpolicy_kl": jnp.mean(offpolicy_kl_B)}
  return -objective, metrics
