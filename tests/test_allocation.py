import numpy as np
import pytest

from mohge_jax import allocation

WIDTHS_3B = (384, 512, 640, 768, 896, 1024, 1152, 1280)


def test_reference_layout_for_eight_groups():
  p = allocation.place(WIDTHS_3B, 8, ep=8)
  assert allocation.interleaved_groups(8) == [0, 7, 1, 6, 2, 5, 3, 4]
  # Block j is the j-th expert of every group, groups interleaved small/large.
  assert p.order[:8] == (0, 56, 8, 48, 16, 40, 24, 32)
  assert p.order[8:16] == (1, 57, 9, 49, 17, 41, 25, 33)
  for r, ids in enumerate(p.experts_by_rank):
    assert sorted(np.array(ids) // 8) == list(range(8))  # one expert of every width
  assert sorted(p.order) == list(range(64))
  assert all(p.order[s] == e for e, s in enumerate(p.slot_of_expert))


@pytest.mark.parametrize("ep", [1, 2, 4, 8, 16, 32])
def test_all_size_balances_params_naive_does_not(ep):
  d = 1024
  params = allocation.rank_params(allocation.place(WIDTHS_3B, 8, ep), WIDTHS_3B, 8, d)
  assert len(set(params.tolist())) == 1
  assert params.sum() == 3 * d * 8 * sum(WIDTHS_3B)
  if ep > 1:
    naive = allocation.rank_params(allocation.place(WIDTHS_3B, 8, ep, "naive"), WIDTHS_3B, 8, d)
    assert allocation.imbalance(naive) > 1.0
    assert naive.sum() == params.sum()


def test_rank_tokens_and_flops(rng):
  G, N, ep, d = 4, 4, 4, 64
  widths = (10, 20, 30, 40)
  tokens = rng.integers(0, 100, size=G * N)
  p = allocation.place(widths, N, ep)
  got_tokens = allocation.rank_tokens(p, tokens)
  got_flops = allocation.rank_flops(p, widths, N, tokens, d)
  for r, ids in enumerate(p.experts_by_rank):
    assert got_tokens[r] == sum(tokens[e] for e in ids)
    assert got_flops[r] == sum(6 * d * tokens[e] * widths[e // N] for e in ids)
  assert allocation.imbalance(np.array([1, 1, 1, 5])) == pytest.approx(2.5)


def test_errors():
  with pytest.raises(ValueError, match="must divide"):
    allocation.place(WIDTHS_3B, 8, ep=3)
  with pytest.raises(ValueError, match="strategy"):
    allocation.place(WIDTHS_3B, 8, ep=8, strategy="random")


def test_balance_report(rng):
  widths, N, ep, d = (10, 20, 30, 40), 4, 4, 8
  tokens_LxE = rng.integers(0, 50, size=(3, 16))
  rep = allocation.balance_report(tokens_LxE, widths, N, ep, d, "naive")
  p = allocation.place(widths, N, ep, "naive")
  for layer in range(3):
    per_rank = [tokens_LxE[layer][list(ids)].sum() for ids in p.experts_by_rank]
    assert rep["token_imbalance"][layer] == pytest.approx(max(per_rank) / np.mean(per_rank))
  assert rep["rank_tokens"] == [sum(tokens_LxE[l][list(ids)].sum() for l in range(3))
                                for ids in p.experts_by_rank]
  # Uniform routing: all-size is balanced in FLOPs, naive is not.
  uniform = np.full((1, 16), 7)
  assert allocation.balance_report(uniform, widths, N, ep, d)["flop_imbalance"] == [1.0]
  assert allocation.balance_report(uniform, widths, N, ep, d, "naive")["flop_imbalance"][0] > 1.5
