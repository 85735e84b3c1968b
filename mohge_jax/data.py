"""Data: text sources -> tokens -> cached train/val streams -> fixed-shape batches.

The path through this module:

  load_documents(source)        (name, text) pairs: named corpora (the stdlib's and the
                                installed packages' Python sources) and/or files
  make_tokenizer(spec)          "byte" or a Hugging Face tokenizers JSON file
  prepare(source, tokenizer)    drop repeated documents (same text), tokenize, append the
                                separator `eos_id` after every document, split train/val by a
                                hash of the document's text, cache as .npy
  export_tokens(prepared, dir)  a portable token directory (`data.source=tokens:DIR`):
                                train.npy, val.npy, meta.json, tokenizer.json
  BatchIterator(train_tokens)   shuffled windows; step s's batch is a pure function of (seed, s)
  eval_batches(val_tokens)      sequential windows for validation loss

A batch is a dict of numpy arrays, all [B, L] (B: this process's rows, L: seq_len):
  inputs (int32), targets (int32, inputs shifted by one), loss_mask (float32), segment_ids
  (int32) and positions (int32). Two layouts (`per_document`, the trainer passes
  model.doc_attention_mask):
  - per_document=False (the reference's, Megatron's default packing): a window is a plain
    slice of the token stream: positions 0..L-1, one segment (0), every target scored
    (loss_mask 1), the first token of a document predicted from the previous one's end.
  - per_document=True: every document on its own: segment_ids +1 after each separator
    (from 0; for the attention mask), positions restart at 0 after each separator, and
    loss_mask is 0 where the input is a separator (the target starts a new document).
  Padding rows of eval_batches have loss_mask 0 in both.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # the running interpreter's standard library (*.py)
SITE_PACKAGES = "site-packages"  # the running interpreter's installed packages (*.py)
TOKENS_PREFIX = "tokens:"  # tokens:DIR, a directory written by export_tokens
CACHE_FORMAT = 2  # Bump when the cached layout or the tokenization/split rules change.
# 2: split by a hash of the text (was: of the name), repeated texts dropped.
DEFAULT_CACHE_DIR = "~/.cache/mohge_jax/tokens"
COMMON_EOS_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>")

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int  # Document separator, appended after every document.
  identity: str  # Changes whenever the token ids of some text would change (cache key).

  def encode(self, text: str) -> list[int]: ...
  def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...  # uint32 arrays
  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; id 256 is the document separator."""

  vocab_size = 257
  eos_id = 256
  identity = "byte-v1"

  def encode(self, text: str) -> list[int]:
    return list(_utf8(text))

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(_utf8(t), np.uint8).astype(np.uint32) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids outside 0..255 (the separator, padded-vocab ids) are dropped."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _utf8(text: str) -> bytes:
  return text.encode("utf-8", errors="replace")  # Lone surrogates (from JSON) become '?'.


class HFTokenizer:
  """A Hugging Face `tokenizers` JSON file. Special-token strings inside a text are encoded
  as plain text, so a document never contains the separator id."""

  def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
    from tokenizers import Tokenizer as _Tokenizer

    self.path = Path(path)
    self._tok = _Tokenizer.from_file(str(self.path))
    self._tok.encode_special_tokens = True
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._find_eos(eos_token)
    digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
    self.identity = f"hf-{digest}-eos{self.eos_id}"

  def _find_eos(self, eos_token: str | None) -> int:
    if eos_token:
      eos_id = self._tok.token_to_id(eos_token)
      if eos_id is None:
        raise ValueError(f"eos_token {eos_token!r} is not in the vocabulary of {self.path}")
      return eos_id
    specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    for name in COMMON_EOS_TOKENS:
      if name in specials:
        return specials[name]
    raise ValueError(
        f"tokenizer {self.path} has no end-of-text token among its special tokens "
        f"{sorted(specials)} (looked for {list(COMMON_EOS_TOKENS)}); "
        "pass the document separator explicitly with data.eos_token=...")

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.uint32) for e in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def make_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
  """`spec` is "byte" or a path to a tokenizers JSON file; an empty eos_token means none."""
  eos_token = eos_token or None
  if spec == "byte":
    if eos_token is not None:
      raise ValueError("eos_token applies to tokenizer files only; 'byte' always uses id 256")
    return ByteTokenizer()
  path = Path(spec).expanduser()
  if not path.is_file():
    raise FileNotFoundError(
        f"tokenizer file not found: {spec!r} (the tokenizer is 'byte' or a tokenizers JSON file)")
  return HFTokenizer(path, eos_token)


# ------------------------------------------------------------------------------ documents


def load_documents(source: str) -> list[tuple[str, str]]:
  """(name, text) pairs in a deterministic order; `source` as `iter_documents` says."""
  return list(iter_documents(source))


def iter_documents(source: str) -> Iterator[tuple[str, str]]:
  """`source` is a comma-separated list; each item is a named corpus or a path / glob:

  - "embedded": the running interpreter's standard library (`embedded_files`),
  - "site-packages": the Python sources of its installed packages (`site_packages_files`),
  - anything else: a file or glob pattern (.txt[.gz], .md, .jsonl[.gz], .parquet, ...).

  Items come in the order given, each one's files sorted; a file named twice is read once,
  where it first appears. ("tokens:DIR", already tokenized, has no documents: `prepare`.)
  """
  for name, path in _source_files(source):
    if name is not None:  # a named corpus' file: the whole file is one document
      yield name, path.read_bytes().decode("utf-8", errors="replace")
    else:
      yield from _read_file(path)


def embedded_files() -> list[tuple[str, Path]]:
  """The running interpreter's standard library: every *.py outside tests and
  site-packages, as ("stdlib/<relative path>", path) sorted by relative path."""
  root = Path(sysconfig.get_paths()["stdlib"])
  skip_dirs = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skip_dirs]  # Prune: never walk into them.
    for name in filenames:  # _sysconfigdata*: machine-generated, not text.
      if name.endswith(".py") and not name.startswith("_sysconfigdata"):
        path = Path(dirpath, name)
        files.append((path.relative_to(root).as_posix(), path))
  if not files:
    raise FileNotFoundError(f"no standard-library sources under {root} for the embedded corpus")
  return [(f"stdlib/{rel}", path) for rel, path in sorted(files)]


# Generated modules (protocol buffers, MLIR dialect bindings): long tables, not prose or code
# a person wrote.
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_ops_gen.py")


def site_packages_files() -> list[tuple[str, Path]]:
  """The Python sources of the running interpreter's installed packages: every *.py under
  its site-packages directories (sysconfig's purelib and platlib: the virtual environment's
  when one is active), tests included, generated modules (`*_pb2.py`, `*_ops_gen.py`) and
  `__pycache__` left out, as ("site-packages/<relative path>", path) sorted by relative
  path. What it holds depends on what is installed: carry the tokens (`export_tokens`) to
  train on the same data elsewhere."""
  paths = sysconfig.get_paths()
  roots = list(dict.fromkeys(Path(paths[k]) for k in ("purelib", "platlib")))
  files: dict[str, Path] = {}
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      for name in filenames:
        if name.endswith(".py") and not name.endswith(_GENERATED_SUFFIXES):
          path = Path(dirpath, name)
          files.setdefault(path.relative_to(root).as_posix(), path)  # first root wins
  if not files:
    raise FileNotFoundError(f"no Python sources under {', '.join(map(str, roots))} for the "
                            f"{SITE_PACKAGES!r} corpus")
  return [(f"site-packages/{rel}", files[rel]) for rel in sorted(files)]


NAMED_SOURCES: dict[str, Callable[[], list[tuple[str, Path]]]] = {
    EMBEDDED: embedded_files, SITE_PACKAGES: site_packages_files}


def _source_items(source: str) -> list[str]:
  items = [item.strip() for item in source.split(",") if item.strip()]
  if not items:
    raise ValueError(f"data source {source!r} names nothing")
  if any(item.startswith(TOKENS_PREFIX) for item in items):
    raise ValueError(f"data source {source!r}: {TOKENS_PREFIX}DIR (already tokenized) stands "
                     "alone, not in a list")
  return items


def _looks_like_a_name(item: str) -> bool:
  return not any(c in item for c in "/\\.*?[~")


def _source_files(source: str) -> list[tuple[str | None, Path]]:
  """(name, path) of every file behind `source` in order; name is None for files given
  by path or pattern (their reader names their documents)."""
  out: list[tuple[str | None, Path]] = []
  seen: set[Path] = set()  # resolved: one file named twice (d/x.txt, /abs/d/x.txt) is read once
  for item in _source_items(source):
    if item in NAMED_SOURCES:
      entries = NAMED_SOURCES[item]()
    else:
      entries = [(None, path) for path in _match(item)]
    for name, path in entries:
      if path.resolve() not in seen:  # A file named twice is read once, where it first appears.
        seen.add(path.resolve())
        out.append((name, path))
  if not out:
    raise FileNotFoundError(f"data source {source!r} names no files")
  return out


def _match(pattern: str) -> list[Path]:
  expanded = os.path.expanduser(pattern)
  if any(c in expanded for c in "*?["):
    matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not matches:
      raise FileNotFoundError(f"data pattern {pattern!r} matches no files")
    return [Path(p) for p in matches]
  if os.path.isfile(expanded):
    return [Path(expanded)]
  if _looks_like_a_name(pattern):
    raise ValueError(
        f"unknown data source {pattern!r} (and no such file): the named sources are "
        f"{', '.join(NAMED_SOURCES)} and {TOKENS_PREFIX}DIR; anything else is a file path or "
        "glob pattern")
  raise FileNotFoundError(f"data file not found: {pattern!r}")


def resolve_files(source: str) -> list[Path]:
  """The files behind `source`, in order (`iter_documents`)."""
  return [path for _, path in _source_files(source)]


def _read_file(path: Path) -> Iterator[tuple[str, str]]:
  """.jsonl[.gz]: a document per line's "text"; .parquet: a document per row of the "text"
  column; anything else (.txt[.gz], .md, ...): the whole file is one document."""
  if path.name.endswith(".parquet"):
    yield from _read_parquet(path)
  elif path.name.removesuffix(".gz").endswith(".jsonl"):
    yield from _read_jsonl(path)
  else:
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    yield str(path), raw.decode("utf-8", errors="replace")


def _read_jsonl(path: Path) -> Iterator[tuple[str, str]]:
  opener = gzip.open if path.name.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
      yield f"{path}:{lineno}", record["text"]


def _read_parquet(path: Path) -> Iterator[tuple[str, str]]:
  import pyarrow.parquet as pq

  columns = pq.read_schema(path).names
  if "text" not in columns:
    raise ValueError(f"{path}: no 'text' column (columns: {columns})")
  for row, text in enumerate(pq.read_table(path, columns=["text"]).column("text").to_pylist()):
    if not isinstance(text, str):
      raise ValueError(f"{path}: row {row} has a non-string text ({text!r})")
    yield f"{path}:{row}", text


# ----------------------------------------------------------------- tokens, split and cache


@dataclasses.dataclass(frozen=True)
class Prepared:
  tokenizer: Tokenizer
  train_tokens: np.ndarray  # uint32 [N_train], memory-mapped from the cache
  val_tokens: np.ndarray  # uint32 [N_val]
  num_docs_train: int
  num_docs_val: int
  cache_path: Path  # The cache entry these arrays were read from.


def is_validation(text: str, val_permille: int) -> bool:
  """Depends only on the document's text: never on its file's name or location (the split
  stays when the corpus moves), nor on the order documents come in."""
  return _rank(text) % 1000 < val_permille


def _rank(text: str) -> int:
  return int.from_bytes(_digest(text), "big")


def _digest(text: str) -> bytes:
  """The document's identity: SHA-1 of its UTF-8 text (repeated documents are dropped)."""
  return hashlib.sha1(_utf8(text)).digest()


@dataclasses.dataclass
class _Split:
  """One side of the split while tokenizing."""
  prefer: Callable  # min for train, max for val: which document to give up when needed.
  chunks: list[np.ndarray] = dataclasses.field(default_factory=list)
  pending: list[np.ndarray] = dataclasses.field(default_factory=list)
  num_tokens: int = 0
  num_docs: int = 0
  spare: tuple | None = None  # (key, offset, length) of the document to give up.

  def add(self, key: tuple[int, int], ids_with_eos: list[np.ndarray]) -> None:
    length = sum(len(a) for a in ids_with_eos)
    doc = (key, self.num_tokens, length)
    self.spare = doc if self.spare is None else self.prefer(self.spare, doc)
    self.pending += ids_with_eos
    self.num_tokens += length
    self.num_docs += 1

  def seal(self) -> None:  # One array per tokenizer batch, not two per document.
    if self.pending:
      self.chunks.append(np.concatenate(self.pending))
      self.pending = []

  def tokens(self) -> np.ndarray:
    self.seal()
    return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.uint32)


def tokenize_split(documents: Iterable[tuple[str, str]], tokenizer: Tokenizer, *,
                   val_permille: int, batch_chars: int = 1 << 24
                   ) -> tuple[np.ndarray, np.ndarray, int, int]:
  """Tokenizes documents, appends `eos_id` after each, splits them by `is_validation`.

  A document whose text was seen before (the same file under another name, a copy) is
  dropped, so no text is in both train and validation, nor twice in one.
  Returns (train_tokens, val_tokens, num_docs_train, num_docs_val), uint32 arrays. Train
  always gets a document; validation gets one too when there are >= 2 distinct documents
  and val_permille > 0 (the document whose hash is nearest the threshold changes side).
  """
  if not 0 <= val_permille <= 1000:
    raise ValueError(f"val_permille must be in [0, 1000], got {val_permille}")
  train, val = _Split(prefer=min), _Split(prefer=max)
  eos_1 = np.array([tokenizer.eos_id], np.uint32)
  seen: set[bytes] = set()
  repeats = 0

  def encode(ranks: list[int], texts: list[str]) -> None:
    for rank, ids in zip(ranks, tokenizer.encode_batch(texts)):
      key = (rank % 1000, rank)
      (val if key[0] < val_permille else train).add(key, [ids.astype(np.uint32), eos_1])
    train.seal()
    val.seal()

  ranks, texts, chars = [], [], 0
  for _, text in documents:
    digest = _digest(text)
    if digest in seen:
      repeats += 1
      continue
    seen.add(digest)
    ranks.append(int.from_bytes(digest, "big"))
    texts.append(text)
    chars += len(text)
    if chars >= batch_chars:
      encode(ranks, texts)
      ranks, texts, chars = [], [], 0
  encode(ranks, texts)
  if repeats:
    log.info("dropped %d repeated documents (same text as an earlier one)", repeats)

  if train.num_docs + val.num_docs == 0:
    raise ValueError("the data source holds no documents")
  train_tokens, val_tokens = train.tokens(), val.tokens()
  if train.num_docs == 0:
    val_tokens, train_tokens = _move(val.spare, val_tokens, train_tokens)
    val.num_docs, train.num_docs = val.num_docs - 1, 1
  elif val.num_docs == 0 and train.num_docs >= 2 and val_permille > 0:
    train_tokens, val_tokens = _move(train.spare, train_tokens, val_tokens)
    train.num_docs, val.num_docs = train.num_docs - 1, 1
  return train_tokens, val_tokens, train.num_docs, val.num_docs


def _move(spare: tuple, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  _, start, length = spare
  doc = src[start:start + length]
  return np.concatenate([src[:start], src[start + length:]]), np.concatenate([dst, doc])


def cache_key(source: str, tokenizer: Tokenizer, val_permille: int) -> str:
  """Changes when the files (resolved paths in order, sizes, mtimes), tokenizer, split or
  format change. Not on how `source` spells them: two spellings of the same files share
  an entry."""
  stats = [(p.resolve(), p.stat()) for p in resolve_files(source)]
  files = [(str(p), st.st_size, st.st_mtime_ns) for p, st in stats]
  spec = dict(format=CACHE_FORMAT, files=files, tokenizer=tokenizer.identity,
              vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, val_permille=val_permille)
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def prepare(source: str, tokenizer_spec: str, *, val_permille: int = 10,
            cache_dir: str | os.PathLike | None = None, eos_token: str | None = None) -> Prepared:
  """Tokenized train/val streams for `source`, read from (or written to) the token cache;
  for "tokens:DIR", read from DIR (`load_tokens`; its split stands, val_permille and
  cache_dir do not apply)."""
  tokenizer = make_tokenizer(tokenizer_spec, eos_token)
  if source.startswith(TOKENS_PREFIX):
    return load_tokens(source[len(TOKENS_PREFIX):], tokenizer)
  root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
  entry = root / cache_key(source, tokenizer, val_permille)
  if not (entry / "meta.json").is_file():
    _write_cache(entry, source, tokenizer, val_permille)
  meta = json.loads((entry / "meta.json").read_text())
  return Prepared(tokenizer=tokenizer,
                  train_tokens=np.load(entry / "train.npy", mmap_mode="r"),
                  val_tokens=np.load(entry / "val.npy", mmap_mode="r"),
                  num_docs_train=meta["num_docs_train"], num_docs_val=meta["num_docs_val"],
                  cache_path=entry)


def _write_cache(entry: Path, source: str, tokenizer: Tokenizer, val_permille: int) -> None:
  """Builds the entry in a temporary directory and renames it into place, so a reader sees
  a complete entry or none (a crash leaves only an ignored `.tmp-*` directory)."""
  start = time.perf_counter()
  train, val, n_train, n_val = tokenize_split(
      iter_documents(source), tokenizer, val_permille=val_permille)
  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
  try:
    np.save(tmp / "train.npy", train)
    np.save(tmp / "val.npy", val)
    meta = dict(source=source, tokenizer=tokenizer.identity, val_permille=val_permille,
                num_docs_train=n_train, num_docs_val=n_val,
                num_tokens_train=len(train), num_tokens_val=len(val))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
      os.replace(tmp, entry)
    except OSError:
      if not (entry / "meta.json").is_file():  # Not a concurrent writer finishing first.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log.info("tokenized %s: %d train / %d val documents, %d / %d tokens in %.1fs -> %s",
           source, n_train, n_val, len(train), len(val), time.perf_counter() - start, entry)


# --------------------------------------------------------- portable token directories


TOKENS_FORMAT = 1


def export_tokens(prepared: Prepared, out_dir: str | os.PathLike, *, source: str,
                  max_train_tokens: int | None = None, extra_meta: dict | None = None) -> Path:
  """Writes `prepared` as a directory that `data.source=tokens:DIR` trains from on any
  machine, without the sources: train.npy and val.npy (uint16 when the vocabulary fits,
  else uint32), meta.json (counts, the tokenizer's identity, where it came from) and, for
  a tokenizer file, a copy of it as tokenizer.json.

  `max_train_tokens` keeps a subset of the training documents (whole documents, chosen by
  a hash of their tokens: a deterministic sample of the whole corpus, not its first
  files), in their original order, of at most that many tokens. Validation is kept whole.
  """
  tok = prepared.tokenizer
  dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
  train, n_train = np.asarray(prepared.train_tokens), prepared.num_docs_train
  if max_train_tokens is not None and len(train) > max_train_tokens:
    train, n_train = _sample_documents(train, tok.eos_id, max_train_tokens)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  for name, arr in (("train", train), ("val", np.asarray(prepared.val_tokens))):
    tmp = out / f".{name}.npy.tmp"
    with open(tmp, "wb") as f:
      np.save(f, arr.astype(dtype))
    os.replace(tmp, out / f"{name}.npy")
  if isinstance(tok, HFTokenizer) and tok.path.resolve() != (out / "tokenizer.json").resolve():
    shutil.copyfile(tok.path, out / "tokenizer.json")
  meta = dict(format=TOKENS_FORMAT, source=source, tokenizer=tok.identity,
              vocab_size=tok.vocab_size, eos_id=tok.eos_id, dtype=np.dtype(dtype).name,
              num_docs_train=n_train, num_docs_val=prepared.num_docs_val,
              num_tokens_train=len(train), num_tokens_val=len(prepared.val_tokens),
              num_tokens_train_before_cap=len(prepared.train_tokens),
              max_train_tokens=max_train_tokens, **(extra_meta or {}))
  (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # last: marks complete
  return out


def _sample_documents(tokens: np.ndarray, eos_id: int, max_tokens: int) -> tuple[np.ndarray, int]:
  """The documents (each ending with eos_id) of lowest token-hash rank that fit in
  `max_tokens`, in their original order; (tokens, number of documents)."""
  ends = np.flatnonzero(tokens == eos_id) + 1
  starts = np.concatenate([[0], ends[:-1]])
  ranks = [hashlib.sha1(np.asarray(tokens[a:b], "<u4").tobytes()).digest()
           for a, b in zip(starts, ends)]
  keep = np.zeros(len(ends), bool)
  total = 0
  for i in sorted(range(len(ends)), key=ranks.__getitem__):
    n = int(ends[i] - starts[i])
    if total + n <= max_tokens:
      keep[i], total = True, total + n
  return np.concatenate([tokens[a:b] for a, b, k in zip(starts, ends, keep) if k]), int(keep.sum())


def load_tokens(directory: str | os.PathLike, tokenizer: Tokenizer) -> Prepared:
  """A directory written by `export_tokens`; refuses a tokenizer other than the one that
  made its tokens."""
  root = Path(directory).expanduser()
  if not (root / "meta.json").is_file():
    raise FileNotFoundError(
        f"{TOKENS_PREFIX}{directory}: no meta.json in {root} (a directory written by "
        "`python -m mohge_jax.data export`)")
  meta = json.loads((root / "meta.json").read_text())
  if meta.get("tokenizer") != tokenizer.identity:
    hint = (f"; its tokenizer is {root / 'tokenizer.json'}"
            if (root / "tokenizer.json").is_file() else "")
    raise ValueError(
        f"{TOKENS_PREFIX}{directory} was tokenized by {meta.get('tokenizer')!r}, but "
        f"data.tokenizer is {tokenizer.identity!r}: set data.tokenizer to the tokenizer that "
        f"made it{hint}")
  return Prepared(tokenizer=tokenizer,
                  train_tokens=np.load(root / "train.npy", mmap_mode="r"),
                  val_tokens=np.load(root / "val.npy", mmap_mode="r"),
                  num_docs_train=meta["num_docs_train"], num_docs_val=meta["num_docs_val"],
                  cache_path=root)


# -------------------------------------------------------------------------------- batches


def batch_from_windows(windows_BxW: np.ndarray, eos_id: int, *,
                       per_document: bool = False) -> Batch:
  """A batch from token windows of seq_len + 1 tokens (W = L + 1); the two layouts of the
  module docstring (`per_document`)."""
  inputs_BxL = np.asarray(windows_BxW[:, :-1], np.int32)
  targets_BxL = np.asarray(windows_BxW[:, 1:], np.int32)
  B, L = inputs_BxL.shape
  if not per_document:
    return dict(inputs=inputs_BxL, targets=targets_BxL, loss_mask=np.ones((B, L), np.float32),
                segment_ids=np.zeros((B, L), np.int32),
                positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy())
  is_eos_BxL = inputs_BxL == eos_id
  after_eos_BxL = np.zeros_like(is_eos_BxL)
  after_eos_BxL[:, 1:] = is_eos_BxL[:, :-1]
  t_L = np.arange(inputs_BxL.shape[1], dtype=np.int32)
  doc_start_BxL = np.maximum.accumulate(np.where(after_eos_BxL, t_L, 0), axis=1)
  return dict(
      inputs=inputs_BxL,
      targets=targets_BxL,
      loss_mask=(~is_eos_BxL).astype(np.float32),
      segment_ids=np.cumsum(after_eos_BxL, axis=1, dtype=np.int32),
      positions=(t_L - doc_start_BxL).astype(np.int32),
  )


def _gather(tokens: np.ndarray, window_ids_B: np.ndarray, seq_len: int) -> np.ndarray:
  offsets_B = np.asarray(window_ids_B, np.int64) * seq_len
  return tokens[offsets_B[:, None] + np.arange(seq_len + 1)]


def _local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  if global_batch % process_count:
    raise ValueError(
        f"global_batch {global_batch} is not divisible by process_count {process_count}")
  b_local = global_batch // process_count
  return slice(process_index * b_local, (process_index + 1) * b_local)


def fingerprint(tokens: np.ndarray, samples: int = 4096) -> str:
  """Cheap identity of a token array: its length and `samples` evenly spaced tokens (every
  token when shorter). Detects a different data set, not necessarily a one-token edit."""
  n = len(tokens)
  idx = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, samples)).astype(np.int64))
  sample = np.asarray(tokens[idx], np.uint32).astype("<u4").tobytes()
  return hashlib.sha1(str(n).encode() + sample).hexdigest()[:16]


class BatchIterator:
  """Shuffled training batches over a 1-D token stream.

  Window i is tokens[i * L : i * L + L + 1] (stride L = seq_len, so consecutive windows share
  one token); there are (len - 1) // L windows, laid out as `batch_from_windows` says
  (`per_document`). Epoch e visits them in the order of
  `np.random.default_rng([seed, e]).permutation`, `global_batch` at a time; an epoch's
  remainder that does not fill a batch is dropped. Step s's batch is thus a pure function
  of (seed, s): resuming is exact and O(1). Each process gets its contiguous rows
  [process_index * B, (process_index + 1) * B) of the global batch, B = global_batch //
  process_count.
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int,
               eos_id: int, process_index: int = 0, process_count: int = 1, start_step: int = 0,
               per_document: bool = False):
    self.tokens = np.asarray(tokens)
    if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
      raise ValueError(
          f"tokens must be a 1-D integer array, got {self.tokens.dtype}{self.tokens.shape}")
    if seq_len < 1 or global_batch < 1:
      raise ValueError(f"seq_len ({seq_len}) and global_batch ({global_batch}) must be >= 1")
    self.seq_len, self.global_batch, self.seed, self.eos_id = seq_len, global_batch, seed, eos_id
    self.per_document = per_document
    self.rows = _local_rows(global_batch, process_index, process_count)
    self.num_windows = max(len(self.tokens) - 1, 0) // seq_len
    if self.num_windows < global_batch:
      raise ValueError(
          f"data too small: {len(self.tokens)} tokens give {self.num_windows} windows of "
          f"seq_len + 1 = {seq_len + 1} tokens, fewer than global_batch = {global_batch}")
    self.batches_per_epoch = self.num_windows // global_batch
    self.step = start_step
    self._fingerprint = fingerprint(self.tokens)
    self._epoch, self._perm = -1, np.zeros(0, np.int64)

  def window_ids(self, step: int) -> np.ndarray:
    """The global batch's window indices at `step`, [global_batch]."""
    epoch, j = divmod(step, self.batches_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch, self._perm = epoch, rng.permutation(self.num_windows)
    return self._perm[j * self.global_batch:(j + 1) * self.global_batch]

  def batch_at(self, step: int) -> Batch:
    ids_B = self.window_ids(step)[self.rows]
    return batch_from_windows(_gather(self.tokens, ids_B, self.seq_len), self.eos_id,
                              per_document=self.per_document)

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> Batch:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def state(self) -> dict:
    """JSON-serialisable; `step` counts global batches consumed."""
    return dict(step=self.step, seed=self.seed, seq_len=self.seq_len,
                global_batch=self.global_batch, num_tokens=len(self.tokens),
                fingerprint=self._fingerprint)

  def restore(self, state: dict) -> None:
    """Continues from a saved `state()`; refuses if the data or batching changed."""
    current = self.state()
    changed = [f"{k}: saved {state.get(k)!r}, now {current[k]!r}"
               for k in ("num_tokens", "fingerprint", "seed", "seq_len", "global_batch")
               if state.get(k) != current[k]]
    if changed:
      raise ValueError("cannot restore the data iterator: the token data or batching changed "
                       f"since the state was saved ({'; '.join(changed)})")
    self.step = int(state["step"])


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch: int, eos_id: int,
                 max_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1, per_document: bool = False) -> Iterator[Batch]:
  """Validation batches: windows 0, 1, 2, ... in order, `batch` (global) at a time, laid
  out as `batch_from_windows` says (`per_document`). The last batch is padded with rows of
  separators only, whose loss_mask is 0, so shapes are fixed and every window is evaluated
  exactly once."""
  tokens = np.asarray(tokens)
  rows = _local_rows(batch, process_index, process_count)
  num_windows = max(len(tokens) - 1, 0) // seq_len
  if num_windows == 0:
    raise ValueError(f"data too small: {len(tokens)} tokens hold no window of seq_len + 1 = "
                     f"{seq_len + 1} tokens")
  num_batches = -(-num_windows // batch)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  for b in range(num_batches):
    ids_B = np.arange(b * batch, (b + 1) * batch)[rows]
    windows_BxW = np.full((len(ids_B), seq_len + 1), eos_id, np.int64)
    real_B = ids_B < num_windows
    windows_BxW[real_B] = _gather(tokens, ids_B[real_B], seq_len)
    out = batch_from_windows(windows_BxW, eos_id, per_document=per_document)
    out["loss_mask"][~real_B] = 0.0
    yield out


# ------------------------------------------------------------------------------ command


def main(argv: list[str] | None = None) -> int:
  """`python -m mohge_jax.data export --source S --tokenizer T --out DIR [...]`."""
  import argparse
  import sys

  p = argparse.ArgumentParser(prog="python -m mohge_jax.data",
                              description="Tokenize a data source into a portable directory "
                                          "(train with data.source=tokens:DIR).")
  sub = p.add_subparsers(dest="command", required=True)
  e = sub.add_parser("export", help=export_tokens.__doc__.split("\n")[0])
  e.add_argument("--source", required=True, help="data.source: names, paths or globs")
  e.add_argument("--tokenizer", required=True, help="'byte' or a tokenizers JSON file")
  e.add_argument("--out", required=True, help="the directory to write")
  e.add_argument("--val-permille", type=int, default=10)
  e.add_argument("--max-train-tokens", type=int, default=None)
  e.add_argument("--cache-dir", default=None, help=f"token cache (default {DEFAULT_CACHE_DIR})")
  e.add_argument("--eos-token", default=None)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    prepared = prepare(args.source, args.tokenizer, val_permille=args.val_permille,
                       cache_dir=args.cache_dir, eos_token=args.eos_token)
    out = export_tokens(prepared, args.out, source=args.source,
                        max_train_tokens=args.max_train_tokens,
                        extra_meta=dict(val_permille=args.val_permille))
  except (FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  meta = json.loads((out / "meta.json").read_text())
  print(f"wrote {out}: {meta['num_tokens_train']:,} train tokens ({meta['num_docs_train']:,} "
        f"documents), {meta['num_tokens_val']:,} validation tokens, {meta['dtype']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
