"""Tests for mohge_jax/tokenizer.py: trained on the training split only, round trips on
held-out text, the command."""

from __future__ import annotations

import pytest

from mohge_jax import data, tokenizer

VAL_PERMILLE = 300


def code_like(rng, n_lines: int) -> str:
  names = ["value", "count", "result", "items", "index", "total", "self", "data"]
  lines = []
  for _ in range(n_lines):
    a, b = rng.choice(names, 2)
    lines.append(f"    {a} = {b}.get({int(rng.integers(100))}) + len({a})  # é ✓")
  return "def f():\n" + "\n".join(lines) + "\n"


def write_corpus(tmp_path, rng, n: int = 30, *, val_word: str = "", train_word: str = ""):
  """n documents; `val_word` repeated in one validation document, `train_word` in one
  training document (each found by trying suffixes until the split puts it there)."""
  d = tmp_path / "corpus"
  d.mkdir()
  for i in range(n):
    (d / f"{i:02d}.py").write_text(code_like(rng, 20), encoding="utf-8")
  for word, want_val, name in ((val_word, True, "val"), (train_word, False, "train")):
    if word:
      for k in range(1000):
        text = f"{code_like(rng, 5)}{(word + ' ') * 200}# {k}\n"
        if data.is_validation(text, VAL_PERMILLE) == want_val:
          (d / f"{name}.py").write_text(text, encoding="utf-8")
          break
  return f"{d}/*.py"


def test_training_texts_are_the_distinct_training_documents(tmp_path, rng):
  source = write_corpus(tmp_path, rng)
  (tmp_path / "corpus" / "copy.py").write_bytes((tmp_path / "corpus" / "00.py").read_bytes())
  texts = tokenizer.training_texts(source, val_permille=VAL_PERMILLE)
  distinct = list(dict.fromkeys(t for _, t in data.load_documents(source)))
  assert texts == [t for t in distinct if not data.is_validation(t, VAL_PERMILLE)]
  assert 0 < len(texts) < len(distinct)
  # A character budget takes a deterministic sample, in source order.
  cap = sum(map(len, texts)) // 2
  sample = tokenizer.training_texts(source, val_permille=VAL_PERMILLE, max_chars=cap)
  assert sample == tokenizer.training_texts(source, val_permille=VAL_PERMILLE, max_chars=cap)
  assert 0 < sum(map(len, sample)) <= cap and sample == [t for t in texts if t in sample]


def test_train_command_round_trips_held_out_text_and_never_saw_it(tmp_path, rng, capsys):
  source = write_corpus(tmp_path, rng, val_word="qzxvalonlyword", train_word="qzxtrainword")
  out = tmp_path / "tok" / "tokenizer.json"
  assert tokenizer.main(["train", "--source", source, "--vocab", "400", "--out", str(out),
                         "--val-permille", str(VAL_PERMILLE)]) == 0
  assert "vocabulary" in capsys.readouterr().out
  tok = data.make_tokenizer(str(out))
  assert tok.eos_id == 0 and 258 <= tok.vocab_size <= 400
  vocab = tok._tok.get_vocab()
  # Trained on the training split only: the training document's repeated word became one
  # token, the validation document's did not.
  assert any("qzxtrainword" in t for t in vocab)
  assert not any("valonly" in t for t in vocab)
  held_out = [t for _, t in data.load_documents(source) if data.is_validation(t, VAL_PERMILLE)]
  assert held_out
  for text in held_out + ["ünïcode ✓ 🙂 \t\r\n  spaces", ""]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eos_id not in ids
  # Subwords: fewer tokens than bytes on code it has not seen.
  assert len(tok.encode(held_out[0])) < 0.6 * len(held_out[0].encode())


def test_train_command_errors(tmp_path, capsys):
  assert tokenizer.main(["train", "--source", "nosuchsource", "--out",
                         str(tmp_path / "t.json")]) == 2
  assert "unknown data source 'nosuchsource'" in capsys.readouterr().err
  with pytest.raises(ValueError, match="at least 258"):
    tokenizer.train(["abc"], 100)
