"""Verifiable tasks for GRPO: generated problems and rule-based rewards (spec §4).

    rng = np.random.default_rng(0)
    p = arithmetic(rng, digits=3)            # "Compute 417*82." -> answer "34194"
    p = countdown(rng, numbers=4)            # reach a target from 4 numbers, by construction
    reward(p, "<think>...</think><answer>34194</answer>")   # 1.0 + format bonus

Difficulty: `digits` (arithmetic) and `numbers`/`max_value` (countdown). The reward is
`accuracy` (1 if the answer checks out) plus `format_weight` if the completion has the
format: an optional `<think>...</think>` (required with require_think) followed by
`<answer>...</answer>` and nothing else.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import re
from fractions import Fraction

import numpy as np

_FORMAT = re.compile(r"^\s*(<think>.*?</think>\s*)?<answer>(.*?)</answer>\s*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Problem:
  kind: str  # "arithmetic" or "countdown"
  prompt: str
  answer: str  # arithmetic: the value; countdown: one solution (any correct one scores)
  numbers: tuple[int, ...] = ()  # countdown: the numbers to use
  target: int = 0  # countdown: the value to reach


def arithmetic(rng: np.random.Generator, digits: int = 2, ops: str = "+-*") -> Problem:
  """a OP b with operands of exactly `digits` digits (1 digit: 0..9)."""
  if digits < 1:
    raise ValueError(f"digits={digits}: must be >= 1")
  lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits
  a, b = (int(v) for v in rng.integers(lo, hi, size=2))
  op = ops[int(rng.integers(len(ops)))]
  value = {"+": a + b, "-": a - b, "*": a * b}[op]
  return Problem("arithmetic", f"Compute {a}{op}{b}.", str(value))


def countdown(rng: np.random.Generator, numbers: int = 4, max_value: int = 20) -> Problem:
  """Numbers 1..max_value and a target reached by combining all of them with + - * /
  (a random expression tree, built so every division is exact and the target is a
  positive integer): solvable by construction."""
  if numbers < 2:
    raise ValueError(f"numbers={numbers}: must be >= 2")
  while True:
    nums = [int(v) for v in rng.integers(1, max_value + 1, size=numbers)]
    items = [(Fraction(n), str(n)) for n in nums]
    while len(items) > 1:
      i, j = (int(k) for k in rng.choice(len(items), size=2, replace=False))
      (a, ea), (b, eb) = items[i], items[j]
      choices = [("+", a + b), ("-", a - b), ("*", a * b)]
      if b != 0 and (a / b).denominator == 1:
        choices.append(("/", a / b))
      op, value = choices[int(rng.integers(len(choices)))]
      items = [it for k, it in enumerate(items) if k not in (i, j)] + [(value, f"({ea}{op}{eb})")]
    value, expr = items[0]
    if value.denominator == 1 and value > 0:
      target = int(value)
      listed = ", ".join(map(str, nums))
      return Problem("countdown", f"Using the numbers {listed} once each, with + - * / and "
                     f"parentheses, make {target}.", expr[1:-1] if expr[0] == "(" else expr,
                     tuple(nums), target)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
  """Numbers, + - * / and parentheses only; integer literals are collected in `used`."""
  if isinstance(node, ast.Expression):
    return _evaluate(node.body, used)
  if isinstance(node, ast.Constant) and type(node.value) is int:
    used.append(node.value)
    return Fraction(node.value)
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
  raise ValueError("not an arithmetic expression")


def extract_answer(completion: str, require_think: bool = False) -> str | None:
  """The text inside <answer>...</answer> if the completion has the format, else None."""
  m = _FORMAT.match(completion)
  if m is None or (require_think and m.group(1) is None):
    return None
  return m.group(2).strip()


def is_correct(problem: Problem, answer: str) -> bool:
  if problem.kind == "arithmetic":
    return answer.replace(" ", "") == problem.answer
  if len(answer) > 200:
    return False
  used: list[int] = []
  try:
    value = _evaluate(ast.parse(answer, mode="eval"), used)
  except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
    return False
  return sorted(used) == sorted(problem.numbers) and value == problem.target


def reward(problem: Problem, completion: str, *, format_weight: float = 0.1,
           require_think: bool = False) -> float:
  """accuracy (0 or 1) + format_weight * (format right); a completion without the format
  scores 0 (its answer cannot be found)."""
  answer = extract_answer(completion, require_think)
  if answer is None:
    return 0.0
  return format_weight + (1.0 if is_correct(problem, answer) else 0.0)
