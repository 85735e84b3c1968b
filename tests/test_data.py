"""Tests for mohge_jax/data.py: tokenizers, document sources, split and cache, batches."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mohge_jax import data

EOS = 256  # ByteTokenizer's separator.


def random_text(rng, n: int) -> str:
  """Random unicode: ASCII, Latin, CJK, emoji, no surrogates (not encodable as UTF-8)."""
  ranges = [(0x20, 0x7F), (0xA0, 0x250), (0x4E00, 0x4F00), (0x1F600, 0x1F650), (0x0A, 0x0B)]
  picks = rng.integers(len(ranges), size=n)
  return "".join(chr(int(rng.integers(*ranges[k]))) for k in picks)


def random_words(rng, n: int) -> str:
  words = ["alpha", "beta", "gamma", "delta", "résumé", "naïve", "x", "42", "\n"]
  return " ".join(words[i] for i in rng.integers(len(words), size=n))


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip(rng):
  tok = data.make_tokenizer("byte")
  assert (tok.vocab_size, tok.eos_id) == (257, 256)
  texts = [random_text(rng, int(rng.integers(0, 60))) for _ in range(20)]
  for text in texts:
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text  # The separator decodes to nothing.
  for text, arr in zip(texts, tok.encode_batch(texts)):
    assert arr.dtype == np.uint32 and arr.tolist() == tok.encode(text)


def train_bpe(path, specials: list[str], rng) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([random_words(rng, 50) for _ in range(20)], trainer)
  tok.save(str(path))
  return str(path)


def test_hf_tokenizer_encode_decode_and_eos(tmp_path, rng):
  path = train_bpe(tmp_path / "tok.json", ["<pad>", "</s>"], rng)
  tok = data.make_tokenizer(path)
  assert isinstance(tok, data.HFTokenizer)
  assert tok.eos_id == 1  # "</s>", the second special token.
  vocab = json.loads(open(path).read())["model"]["vocab"]
  assert tok.vocab_size == max(vocab.values()) + 1 > 256
  for _ in range(10):
    text = random_words(rng, int(rng.integers(1, 30)))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text])[0].tolist() == ids
  # A special-token string inside a document is text, never the separator.
  assert tok.eos_id not in tok.encode("alpha </s> beta")
  # eos_token picks a different separator; an unknown one is refused by name.
  assert data.make_tokenizer(path, eos_token="<pad>").eos_id == 0
  with pytest.raises(ValueError, match="<nope>"):
    data.make_tokenizer(path, eos_token="<nope>")


def test_hf_tokenizer_without_eos_asks_for_eos_token(tmp_path, rng):
  path = train_bpe(tmp_path / "tok.json", ["<pad>", "<mask>"], rng)
  with pytest.raises(ValueError, match=r"data\.eos_token="):
    data.make_tokenizer(path)
  assert data.make_tokenizer(path, eos_token="<mask>").eos_id == 1


def test_make_tokenizer_errors(tmp_path):
  missing = str(tmp_path / "nothere.json")
  with pytest.raises(FileNotFoundError, match="nothere.json"):
    data.make_tokenizer(missing)
  with pytest.raises(ValueError, match="eos_token"):
    data.make_tokenizer("byte", eos_token="</s>")
  assert data.make_tokenizer("byte", eos_token="").eos_id == 256  # "" (the config default).


# ------------------------------------------------------------------------------ documents


def test_load_text_files_glob_sorted_and_comma_list(tmp_path, rng, monkeypatch):
  texts = {f"d{i}.txt": random_text(rng, 40) for i in rng.permutation(5)}  # Written unsorted.
  (tmp_path / "docs").mkdir()
  for name, text in texts.items():
    (tmp_path / "docs" / name).write_text(text, encoding="utf-8")
  (tmp_path / "notes.md").write_text("# notes", encoding="utf-8")
  (tmp_path / "z.txt.gz").write_bytes(gzip.compress("zipped".encode()))
  monkeypatch.setenv("HOME", str(tmp_path))

  docs = data.load_documents(f"{tmp_path}/docs/*.txt, ~/notes.md,{tmp_path}/z.txt.gz")
  want = [(str(tmp_path / "docs" / n), texts[n]) for n in sorted(texts)]
  want += [(str(tmp_path / "notes.md"), "# notes"), (str(tmp_path / "z.txt.gz"), "zipped")]
  assert docs == want
  # A file matched twice is read once, where it first appears: also when spelled
  # differently (relative and absolute, through a symlinked directory).
  d3 = (str(tmp_path / "docs" / "d3.txt"), texts["d3.txt"])
  assert data.load_documents(f"{tmp_path}/docs/d3.txt,{tmp_path}/docs/*.txt") == [d3] + [
      d for d in want[:5] if d != d3]
  (tmp_path / "link").symlink_to(tmp_path / "docs")
  monkeypatch.chdir(tmp_path)
  docs = data.load_documents(f"docs/*.txt,{tmp_path}/docs/*.txt,link/d3.txt,./docs/d1.txt")
  assert [t for _, t in docs] == [t for _, t in want[:5]]


def test_load_jsonl_and_parquet(tmp_path, rng):
  texts = [random_text(rng, int(rng.integers(0, 30))) for _ in range(7)]
  lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
  lines.insert(3, "   ")  # Blank lines are skipped; names keep the file's line numbers.
  (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
  pq.write_table(pa.table({"id": list(range(7)), "text": texts}), tmp_path / "c.parquet")

  lineno = [1, 2, 3, 5, 6, 7, 8]
  for name in ["a.jsonl", "b.jsonl.gz"]:
    path = tmp_path / name
    assert data.load_documents(str(path)) == [(f"{path}:{n}", t) for n, t in zip(lineno, texts)]
  path = tmp_path / "c.parquet"
  assert data.load_documents(str(path)) == [(f"{path}:{r}", t) for r, t in enumerate(texts)]


def test_load_documents_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    data.load_documents(str(tmp_path / "missing.txt"))
  with pytest.raises(FileNotFoundError, match=r"nomatch\*\.jsonl"):
    data.load_documents(str(tmp_path / "nomatch*.jsonl"))

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n\n{"content": "no text"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=f"{bad}:3"):
    data.load_documents(str(bad))
  bad.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
  with pytest.raises(ValueError, match=f"{bad}:2: invalid JSON"):
    data.load_documents(str(bad))

  pq.write_table(pa.table({"body": ["a"], "lang": ["en"]}), tmp_path / "bad.parquet")
  with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['body', 'lang'\]\)"):
    data.load_documents(str(tmp_path / "bad.parquet"))


def test_embedded_corpus_is_library_text_and_deterministic():
  files = data.embedded_files()
  assert files == data.embedded_files()
  names = [name for name, _ in files]
  assert names == sorted(names) and len(set(names)) == len(names)
  assert {"stdlib/os.py", "stdlib/json/__init__.py", "stdlib/pydoc_data/topics.py"} <= set(names)
  for name in names:
    parts = name.split("/")
    assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), name
  assert sum(path.stat().st_size for _, path in files) > 5_000_000


def test_embedded_prepare_counts_every_byte(tmp_path):
  prepared = data.prepare("embedded", "byte", cache_dir=tmp_path)
  docs = list({text: None for _, text in data.load_documents("embedded")})  # distinct texts
  num_bytes = sum(len(text.encode("utf-8")) for text in docs)
  assert prepared.num_docs_train + prepared.num_docs_val == len(docs)
  assert prepared.num_docs_val >= 1
  assert len(prepared.train_tokens) + len(prepared.val_tokens) == num_bytes + len(docs)
  assert np.sum(prepared.train_tokens == EOS) == prepared.num_docs_train
  assert np.sum(prepared.val_tokens == EOS) == prepared.num_docs_val


def fake_site_packages(tmp_path, monkeypatch):
  """An interpreter whose site-packages holds a few packages (unsorted on disk)."""
  site = tmp_path / "venv" / "site-packages"
  files = {"zpkg/__init__.py": "z = 1\n", "apkg/mod.py": "def f():\n  return 2\n",
           "apkg/__init__.py": "", "apkg/tests/test_mod.py": "assert True\n",
           "apkg/__pycache__/mod.cpython-312.py": "cached", "apkg/api_pb2.py": "generated",
           "apkg/_x_ops_gen.py": "generated", "apkg/data.json": "{}", "top.py": "TOP = 0\n"}
  for rel, text in files.items():
    (site / rel).parent.mkdir(parents=True, exist_ok=True)
    (site / rel).write_text(text)
  real = data.sysconfig.get_paths()
  monkeypatch.setattr(data.sysconfig, "get_paths",
                      lambda: {**real, "purelib": str(site), "platlib": str(site)})
  return site, files


def test_site_packages_corpus_is_sorted_python_sources(tmp_path, monkeypatch):
  site, files = fake_site_packages(tmp_path, monkeypatch)
  want = ["apkg/__init__.py", "apkg/mod.py", "apkg/tests/test_mod.py", "top.py",
          "zpkg/__init__.py"]  # sorted; no __pycache__, generated modules or non-Python files
  assert data.site_packages_files() == [(f"site-packages/{r}", site / r) for r in want]
  assert data.load_documents("site-packages") == [(f"site-packages/{r}", files[r])
                                                  for r in want]


def test_real_site_packages_corpus_is_deterministic():
  files = data.site_packages_files()
  assert files == data.site_packages_files()
  names = [name for name, _ in files]
  assert names == sorted(names) and len(set(names)) == len(names)
  assert "site-packages/numpy/__init__.py" in names
  assert all(n.endswith(".py") and "__pycache__" not in n and not n.endswith("_pb2.py")
             for n in names)


def test_named_sources_and_paths_combine_in_order(tmp_path, monkeypatch):
  site, files = fake_site_packages(tmp_path, monkeypatch)
  (tmp_path / "extra.txt").write_text("extra text")
  source = f"site-packages, {tmp_path}/extra.txt,embedded"
  docs = data.load_documents(source)
  n_site = len(data.site_packages_files())
  assert [name for name, _ in docs[:n_site]] == [n for n, _ in data.site_packages_files()]
  assert docs[n_site] == (str(tmp_path / "extra.txt"), "extra text")
  assert [name for name, _ in docs[n_site + 1:]] == [n for n, _ in data.embedded_files()]
  # A file named by path and inside a named corpus is read once, where it first appears.
  again = data.resolve_files(f"{site}/top.py,site-packages")
  assert again[0] == site / "top.py" and again.count(site / "top.py") == 1
  assert len(again) == n_site


def test_unknown_source_names_are_refused_clearly(tmp_path):
  for bad in ["site_packages", "stdlib", "embedded,sitepackages"]:
    name = bad.split(",")[-1]
    with pytest.raises(ValueError, match=rf"unknown data source '{name}'.*embedded, "
                                         r"site-packages and tokens:DIR"):
      data.load_documents(bad)
  with pytest.raises(ValueError, match="stands alone"):
    data.resolve_files(f"embedded,tokens:{tmp_path}")
  with pytest.raises(ValueError, match="names nothing"):
    data.resolve_files(" , ")
  with pytest.raises(FileNotFoundError, match="data file not found: 'missing.txt'"):
    data.resolve_files("missing.txt")


def test_export_tokens_and_train_from_the_directory(tmp_path, rng):
  source = write_corpus(tmp_path, rng, n=40)
  prepared = data.prepare(source, "byte", val_permille=200, cache_dir=tmp_path / "cache")
  full = split_docs(np.asarray(prepared.train_tokens))
  cap = len(prepared.train_tokens) // 2
  out = data.export_tokens(prepared, tmp_path / "tokens", source=source, max_train_tokens=cap)
  meta = json.loads((out / "meta.json").read_text())
  assert meta["dtype"] == "uint16" and meta["tokenizer"] == "byte-v1"
  loaded = data.prepare(f"tokens:{out}", "byte")
  assert loaded.train_tokens.dtype == np.uint16 and loaded.cache_path == out
  kept = split_docs(np.asarray(loaded.train_tokens))
  # Whole documents, at most the cap, in their original order, a deterministic choice.
  assert 0 < len(loaded.train_tokens) <= cap and len(kept) == loaded.num_docs_train
  positions = [full.index(doc) for doc in kept]
  assert positions == sorted(positions)
  np.testing.assert_array_equal(loaded.val_tokens, prepared.val_tokens)  # kept whole
  again = data.export_tokens(prepared, tmp_path / "again", source=source, max_train_tokens=cap)
  assert (again / "train.npy").read_bytes() == (out / "train.npy").read_bytes()
  # Without a cap: everything.
  whole = data.export_tokens(prepared, tmp_path / "whole", source=source)
  np.testing.assert_array_equal(data.prepare(f"tokens:{whole}", "byte").train_tokens,
                                prepared.train_tokens)


def test_tokens_directory_keeps_its_tokenizer(tmp_path, rng):
  tok_path = train_bpe(tmp_path / "tok.json", ["</s>"], rng)
  (tmp_path / "corpus").mkdir()
  for i in range(10):
    (tmp_path / "corpus" / f"{i}.txt").write_text(random_words(rng, 40))
  prepared = data.prepare(f"{tmp_path}/corpus/*.txt", tok_path, val_permille=300,
                          cache_dir=tmp_path / "cache")
  out = data.export_tokens(prepared, tmp_path / "tokens", source="corpus")
  assert (out / "tokenizer.json").read_bytes() == open(tok_path, "rb").read()
  loaded = data.prepare(f"tokens:{out}", str(out / "tokenizer.json"))
  np.testing.assert_array_equal(loaded.train_tokens, prepared.train_tokens)
  with pytest.raises(ValueError, match=r"was tokenized by 'hf-.*data.tokenizer is 'byte-v1'.*"
                                       r"its tokenizer is .*tokenizer.json"):
    data.prepare(f"tokens:{out}", "byte")
  with pytest.raises(FileNotFoundError, match="no meta.json"):
    data.prepare(f"tokens:{tmp_path / 'nowhere'}", "byte")


def test_export_command(tmp_path, rng, capsys):
  source = write_corpus(tmp_path, rng, n=20)
  assert data.main(["export", "--source", source, "--tokenizer", "byte", "--out",
                    str(tmp_path / "out"), "--val-permille", "100", "--max-train-tokens", "300",
                    "--cache-dir", str(tmp_path / "cache")]) == 0
  assert "train tokens" in capsys.readouterr().out
  meta = json.loads((tmp_path / "out" / "meta.json").read_text())
  assert meta["num_tokens_train"] <= 300 and meta["val_permille"] == 100
  assert data.main(["export", "--source", "nosuchsource", "--tokenizer", "byte", "--out",
                    str(tmp_path / "x")]) == 2
  assert "unknown data source 'nosuchsource'" in capsys.readouterr().err


# ----------------------------------------------------------------------- split and cache


def split_docs(tokens: np.ndarray) -> list[bytes]:
  """Documents back from a byte-token stream (each ends with a separator)."""
  assert len(tokens) == 0 or tokens[-1] == EOS
  ends = np.flatnonzero(tokens == EOS)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [np.asarray(tokens[s:e], np.uint8).tobytes() for s, e in zip(starts, ends)]


def test_split_is_by_text_deterministic_disjoint_complete(rng):
  docs = [(f"doc-{rng.integers(1 << 40)}", random_text(rng, int(rng.integers(0, 20))))
          for _ in range(300)]
  docs += [(f"copy-{i}", docs[int(i)][1]) for i in rng.integers(0, 300, 30)]  # repeats
  docs = [docs[i] for i in rng.permutation(len(docs))]
  permille = int(rng.integers(50, 500))
  tok = data.ByteTokenizer()
  train, val, n_train, n_val = data.tokenize_split(docs, tok, val_permille=permille,
                                                   batch_chars=int(rng.integers(1, 500)))
  assert train.dtype == val.dtype == np.uint32
  distinct = list({t: None for _, t in docs})  # each text once, where it first appears
  in_val = [sha1_key(t)[0] < permille for t in distinct]
  want_val = [t.encode() for t, v in zip(distinct, in_val) if v]
  want_train = [t.encode() for t, v in zip(distinct, in_val) if not v]
  assert [data.is_validation(t, permille) for t in distinct] == in_val
  assert split_docs(val) == want_val and split_docs(train) == want_train
  assert (n_train, n_val) == (len(want_train), len(want_val))
  # The split depends on texts only, not on names nor on the order documents come in.
  shuffled = [(f"elsewhere/{rng.integers(1 << 40)}", docs[i][1])
              for i in rng.permutation(len(docs))]
  _, val2, _, _ = data.tokenize_split(shuffled, tok, val_permille=permille)
  assert sorted(split_docs(val2)) == sorted(want_val)


def sha1_key(text: str) -> tuple[int, int]:
  h = int(hashlib.sha1(text.encode()).hexdigest(), 16)
  return h % 1000, h


def test_split_guarantees_a_document_on_each_side(rng):
  tok = data.ByteTokenizer()
  docs = [(f"n{rng.integers(1 << 40)}", random_text(rng, 10)) for _ in range(3)]
  docs = [d for d in docs if sha1_key(d[1])[0] > 0][:2]  # None in validation at 1 permille.
  nearest_val = min(docs, key=lambda d: sha1_key(d[1]))[1].encode()
  nearest_train = max(docs, key=lambda d: sha1_key(d[1]))[1].encode()
  train, val, n_train, n_val = data.tokenize_split(docs, tok, val_permille=1)
  assert (n_train, n_val) == (1, 1) and split_docs(val) == [nearest_val]
  train, val, n_train, n_val = data.tokenize_split(docs, tok, val_permille=1000)  # All val.
  assert (n_train, n_val) == (1, 1) and split_docs(train) == [nearest_train]
  assert sorted(split_docs(train) + split_docs(val)) == sorted(t.encode() for _, t in docs)
  _, val, _, n_val = data.tokenize_split(docs, tok, val_permille=0)  # 0: no validation.
  assert n_val == 0 and len(val) == 0
  train, _, n_train, n_val = data.tokenize_split(docs[:1], tok, val_permille=1000)
  assert (n_train, n_val) == (1, 0) and split_docs(train) == [docs[0][1].encode()]
  with pytest.raises(ValueError, match="no documents"):
    data.tokenize_split([], tok, val_permille=10)
  with pytest.raises(ValueError, match="val_permille"):
    data.tokenize_split(docs, tok, val_permille=1001)


def write_corpus(tmp_path, rng, n=12) -> str:
  for i in range(n):
    (tmp_path / "corpus").mkdir(exist_ok=True)
    (tmp_path / "corpus" / f"{i:02d}.txt").write_text(random_text(rng, 50), encoding="utf-8")
  return f"{tmp_path}/corpus/*.txt"


def test_one_file_under_two_spellings_or_a_copy_is_read_once(tmp_path, rng, monkeypatch):
  """Validation documents cannot leak into training: the same file reached by two spellings
  (relative and absolute), or a copy of it under another name, is one document."""
  write_corpus(tmp_path, rng, n=30)
  (tmp_path / "copies").mkdir()
  for i in rng.choice(30, 5, replace=False):
    (tmp_path / "copies" / f"copy{i}.txt").write_bytes(
        (tmp_path / "corpus" / f"{i:02d}.txt").read_bytes())
  monkeypatch.chdir(tmp_path)
  prepared = data.prepare(f"corpus/*.txt,{tmp_path}/corpus/*.txt,copies/*.txt", "byte",
                          val_permille=500, cache_dir=tmp_path / "cache")
  docs = split_docs(np.asarray(prepared.train_tokens)) + split_docs(
      np.asarray(prepared.val_tokens))
  texts = sorted(p.read_bytes() for p in (tmp_path / "corpus").iterdir())
  assert sorted(docs) == texts  # every document once, on one side
  assert prepared.num_docs_train + prepared.num_docs_val == 30
  assert prepared.num_docs_train >= 1 and prepared.num_docs_val >= 1


def test_split_does_not_change_when_the_corpus_moves(tmp_path, rng):
  write_corpus(tmp_path, rng, n=40)
  moved = tmp_path / "elsewhere" / "renamed"
  moved.mkdir(parents=True)
  for i, path in enumerate(rng.permutation(sorted((tmp_path / "corpus").iterdir()))):
    (moved / f"doc-{i:03d}-{rng.integers(1 << 30)}.txt").write_bytes(path.read_bytes())
  a = data.prepare(f"{tmp_path}/corpus/*.txt", "byte", val_permille=500,
                   cache_dir=tmp_path / "cache")
  b = data.prepare(f"{moved}/*.txt", "byte", val_permille=500, cache_dir=tmp_path / "cache")
  assert 0 < a.num_docs_val < 40
  assert sorted(split_docs(np.asarray(a.val_tokens))) == sorted(
      split_docs(np.asarray(b.val_tokens)))
  assert sorted(split_docs(np.asarray(a.train_tokens))) == sorted(
      split_docs(np.asarray(b.train_tokens)))


def test_cache_hit_and_invalidation(tmp_path, rng, monkeypatch):
  source, cache = write_corpus(tmp_path, rng), tmp_path / "cache"
  first = data.prepare(source, "byte", val_permille=200, cache_dir=cache)
  assert isinstance(first.train_tokens, np.memmap)

  def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenized again despite a cache entry")

  with monkeypatch.context() as m:
    m.setattr(data, "tokenize_split", no_tokenizing)
    again = data.prepare(source, "byte", val_permille=200, cache_dir=cache)
  assert again.cache_path == first.cache_path
  np.testing.assert_array_equal(again.train_tokens, first.train_tokens)
  np.testing.assert_array_equal(again.val_tokens, first.val_tokens)
  assert (again.num_docs_train, again.num_docs_val) == (first.num_docs_train, first.num_docs_val)

  # Another split is another entry; so is a changed file.
  other_split = data.prepare(source, "byte", val_permille=300, cache_dir=cache)
  assert other_split.cache_path != first.cache_path
  changed = tmp_path / "corpus" / "05.txt"
  new_text = "".join(chr(c) for c in rng.integers(0x20, 0x7F, len(changed.read_bytes())))
  changed.write_text(new_text, encoding="utf-8")  # Same size: only the mtime tells.
  os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
  after = data.prepare(source, "byte", val_permille=200, cache_dir=cache)
  assert after.cache_path != first.cache_path
  tokens = np.concatenate([after.train_tokens, after.val_tokens])
  assert new_text.encode() in split_docs(tokens)


def test_cache_write_failure_leaves_no_entry(tmp_path, rng, monkeypatch):
  source, cache = write_corpus(tmp_path, rng), tmp_path / "cache"
  real_save = np.save

  def crash_on_val(path, arr):
    if str(path).endswith("val.npy"):
      raise OSError("disk full")
    real_save(path, arr)

  with monkeypatch.context() as m:
    m.setattr(data.np, "save", crash_on_val)
    with pytest.raises(OSError, match="disk full"):
      data.prepare(source, "byte", cache_dir=cache)
  assert list(cache.iterdir()) == []  # No entry, no temporary left behind.
  prepared = data.prepare(source, "byte", cache_dir=cache)
  assert len(prepared.train_tokens) > 0 and (prepared.cache_path / "meta.json").is_file()


# -------------------------------------------------------------------------------- batches


def random_stream(rng, n: int, eos_prob: float) -> np.ndarray:
  tokens = rng.integers(0, EOS, size=n).astype(np.uint32)
  tokens[rng.random(n) < eos_prob] = EOS
  return tokens


def reference_features(inputs_L: list[int], per_document: bool = True
                       ) -> tuple[list[float], list[int], list[int]]:
  if not per_document:  # plain windows: every target scored, one segment, 0..L-1
    return [1.0] * len(inputs_L), [0] * len(inputs_L), list(range(len(inputs_L)))
  mask, segments, positions = [], [], []
  segment, position = 0, 0
  for token in inputs_L:
    mask.append(0.0 if token == EOS else 1.0)
    segments.append(segment)
    positions.append(position)
    position += 1
    if token == EOS:
      segment, position = segment + 1, 0
  return mask, segments, positions


def check_batch(batch, tokens, seq_len, rows, per_document):
  assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
  for key, value in batch.items():
    assert value.shape == (rows, seq_len), key
    assert value.dtype == (np.float32 if key == "loss_mask" else np.int32), key
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  num_windows = (len(tokens) - 1) // seq_len
  windows = {tuple(tokens[i * seq_len:(i + 1) * seq_len + 1]) for i in range(num_windows)}
  for row in range(rows):
    inputs = batch["inputs"][row]
    assert tuple(inputs) + (batch["targets"][row, -1],) in windows  # A real window.
    mask, segments, positions = reference_features(inputs.tolist(), per_document)
    assert batch["loss_mask"][row].tolist() == mask
    assert batch["segment_ids"][row].tolist() == segments
    assert batch["positions"][row].tolist() == positions


@pytest.mark.parametrize("per_document", [False, True])
@pytest.mark.parametrize("eos_prob", [0.0, 0.05, 0.5])
def test_batch_features_match_reference(rng, eos_prob, per_document):
  """per_document=False (the default, the reference's packing): positions 0..L-1 whatever
  the separators; True: positions and segments restart, the separator's target unscored."""
  seq_len, batch = int(rng.integers(1, 40)), int(rng.integers(1, 6))
  tokens = random_stream(rng, int(rng.integers(batch * seq_len + 1, 2000)), eos_prob)
  it = data.BatchIterator(tokens, seq_len=seq_len, global_batch=batch, seed=int(rng.integers(1000)),
                          eos_id=EOS, **({"per_document": True} if per_document else {}))
  for _ in range(3):
    check_batch(next(it), tokens, seq_len, batch, per_document)


def test_batches_are_a_function_of_seed_and_step_and_resume_exactly(rng):
  tokens = random_stream(rng, int(rng.integers(500, 1500)), 0.02)
  kwargs = dict(seq_len=int(rng.integers(4, 16)), global_batch=int(rng.integers(1, 8)), eos_id=EOS)
  seed = int(rng.integers(1 << 31))
  it = data.BatchIterator(tokens, seed=seed, **kwargs)
  steps = 3 * it.batches_per_epoch + 2  # Crosses epoch boundaries.
  cut = int(rng.integers(0, steps))
  states, batches = {}, []
  for step in range(steps):
    states[step] = json.loads(json.dumps(it.state()))
    batches.append(next(it))
  assert states[cut]["step"] == cut

  resumed = data.BatchIterator(tokens, seed=seed, **kwargs)
  resumed.restore(states[cut])
  started = data.BatchIterator(tokens, seed=seed, start_step=cut, **kwargs)
  for step in range(cut, steps):
    for other in (next(resumed), next(started)):
      for key in batches[step]:
        np.testing.assert_array_equal(other[key], batches[step][key])

  other_seed = data.BatchIterator(tokens, seed=seed + 1, **kwargs)
  assert any(not np.array_equal(next(other_seed)["inputs"], b["inputs"]) for b in batches)


def test_epochs_follow_the_documented_permutations(rng):
  seq_len, batch = int(rng.integers(2, 10)), int(rng.integers(1, 5))
  tokens = np.arange(int(rng.integers(batch * seq_len + 1, 400)), dtype=np.uint32)  # No EOS.
  seed = int(rng.integers(1 << 31))
  it = data.BatchIterator(tokens, seq_len=seq_len, global_batch=batch, seed=seed, eos_id=EOS)
  num_windows = (len(tokens) - 1) // seq_len
  assert it.batches_per_epoch == num_windows // batch  # The epoch's remainder is dropped.
  used = it.batches_per_epoch * batch
  for epoch in range(3):
    starts = np.concatenate([next(it)["inputs"][:, 0] for _ in range(it.batches_per_epoch)])
    assert len(set(starts.tolist())) == used  # No window twice within an epoch.
    order = np.random.default_rng([seed, epoch]).permutation(num_windows)[:used]
    np.testing.assert_array_equal(starts, order * seq_len)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_batches_concatenate_to_global_batch(rng, process_count):
  tokens = random_stream(rng, 3000, 0.03)
  kwargs = dict(seq_len=16, global_batch=8, seed=int(rng.integers(1000)), eos_id=EOS)
  step = int(rng.integers(0, 40))
  full = data.BatchIterator(tokens, start_step=step, **kwargs)
  local = [data.BatchIterator(tokens, process_index=p, process_count=process_count,
                              start_step=step, **kwargs) for p in range(process_count)]
  for _ in range(3):
    want = next(full)
    got = [next(it) for it in local]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_batch_iterator_errors(rng):
  tokens = random_stream(rng, 100, 0.1)
  with pytest.raises(ValueError, match=r"100 tokens give 6 windows .* global_batch = 7"):
    data.BatchIterator(tokens, seq_len=16, global_batch=7, seed=0, eos_id=EOS)
  with pytest.raises(ValueError, match="not divisible by process_count 4"):
    data.BatchIterator(tokens, seq_len=4, global_batch=6, seed=0, eos_id=EOS, process_count=4)

  it = data.BatchIterator(tokens, seq_len=4, global_batch=2, seed=0, eos_id=EOS)
  next(it)
  edited = tokens.copy()
  edited[int(rng.integers(100))] += 1  # Same length, one token changed.
  with pytest.raises(ValueError, match="fingerprint"):
    data.BatchIterator(edited, seq_len=4, global_batch=2, seed=0, eos_id=EOS).restore(it.state())
  with pytest.raises(ValueError, match="num_tokens"):
    shorter = data.BatchIterator(tokens[:-1], seq_len=4, global_batch=2, seed=0, eos_id=EOS)
    shorter.restore(it.state())
  with pytest.raises(ValueError, match="seed: saved 0, now 1"):
    data.BatchIterator(tokens, seq_len=4, global_batch=2, seed=1, eos_id=EOS).restore(it.state())


@pytest.mark.parametrize("per_document", [False, True])
def test_eval_batches_are_sequential_and_padded(rng, per_document):
  seq_len, batch = int(rng.integers(2, 12)), 4
  tokens = random_stream(rng, int(rng.integers(seq_len + 1, 300)), 0.05)
  num_windows = (len(tokens) - 1) // seq_len
  batches = list(data.eval_batches(tokens, seq_len=seq_len, batch=batch, eos_id=EOS,
                                   per_document=per_document))
  assert len(batches) == -(-num_windows // batch)
  rows = np.concatenate([b["inputs"] for b in batches])
  masks = np.concatenate([b["loss_mask"] for b in batches])
  for i in range(num_windows):  # Window i is row i, in order.
    np.testing.assert_array_equal(rows[i], tokens[i * seq_len:(i + 1) * seq_len])
    assert masks[i].tolist() == reference_features(rows[i].tolist(), per_document)[0]
  assert not masks[num_windows:].any()  # Padding rows are never scored.
  if num_windows >= batch:
    check_batch(batches[0], tokens, seq_len, batch, per_document)

  halves = [list(data.eval_batches(tokens, seq_len=seq_len, batch=batch, eos_id=EOS,
                                   process_index=p, process_count=2)) for p in range(2)]
  for whole, lo, hi in zip(batches, *halves):
    np.testing.assert_array_equal(np.concatenate([lo["inputs"], hi["inputs"]]), whole["inputs"])
  capped = data.eval_batches(tokens, seq_len=seq_len, batch=1, eos_id=EOS, max_batches=2)
  assert len(list(capped)) == min(num_windows, 2)  # The cap never invents batches.
  with pytest.raises(ValueError, match="data too small"):
    next(data.eval_batches(tokens[:seq_len], seq_len=seq_len, batch=batch, eos_id=EOS))
