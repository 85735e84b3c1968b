"""Verifiable tasks: problems are solvable and their references score, the format is
checked, wrong or malformed answers do not score, difficulty is honoured."""

import numpy as np
import pytest

from mohge_jax import tasks


@pytest.mark.parametrize("digits", [1, 3, 6])
def test_arithmetic(rng, digits):
  for _ in range(50):
    p = tasks.arithmetic(rng, digits=digits)
    a, op, b = __import__("re").match(r"Compute (\d+)([-+*])(\d+)\.", p.prompt).groups()
    assert all(len(x) == digits for x in (a, b))
    assert int(p.answer) == eval(f"{a}{op}{b}")  # noqa: S307 - digits and one operator
    assert tasks.reward(p, f"<answer>{p.answer}</answer>") == pytest.approx(1.1)
    assert (tasks.reward(p, f"<think>easy</think>\n<answer> {p.answer} </answer>")
            == pytest.approx(1.1))
    assert tasks.reward(p, f"<answer>{int(p.answer) + 1}</answer>") == pytest.approx(0.1)
    assert tasks.reward(p, p.answer) == 0.0  # no format: no answer
    assert tasks.reward(p, f"<answer>{p.answer}</answer> and more") == 0.0
    assert tasks.reward(p, f"<answer>{p.answer}</answer>", require_think=True) == 0.0


@pytest.mark.parametrize("numbers", [2, 4, 6])
def test_countdown_is_solvable_and_checked(rng, numbers):
  for _ in range(30):
    p = tasks.countdown(rng, numbers=numbers, max_value=12)
    assert len(p.numbers) == numbers and p.target > 0 and all(1 <= n <= 12 for n in p.numbers)
    assert tasks.reward(p, f"<think>x</think><answer>{p.answer}</answer>") == pytest.approx(1.1)
  p = tasks.Problem("countdown", "", "", (3, 5, 2), 13)
  assert tasks.is_correct(p, "3*5-2") and tasks.is_correct(p, "(5 - 2) * 3 + 4 * 1") is False
  assert not tasks.is_correct(p, "3*5")  # every number once
  assert not tasks.is_correct(p, "3*5-2+0")
  assert not tasks.is_correct(p, "__import__('os')") and not tasks.is_correct(p, "3**5")
  assert not tasks.is_correct(p, "3/(5-5)*2")
  assert tasks.is_correct(tasks.Problem("countdown", "", "", (6, 4, 2), 3), "6/4*2")  # exact


def test_bad_difficulty():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError):
    tasks.arithmetic(rng, digits=0)
  with pytest.raises(ValueError):
    tasks.countdown(rng, numbers=1)
