"""Train a byte-level BPE tokenizer on the training split of a data source.

    python -m mohge_jax.tokenizer train --source embedded,site-packages --vocab 8192 \
        --out data_cache/python/tokenizer.json [--val-permille 20] [--max-chars N]

The tokenizer sees only training documents: the distinct documents of `source` that
`data.is_validation(text, val_permille)` puts on the training side, so pass the same
`--val-permille` as the data (`data.val_permille`, or `python -m mohge_jax.data export
--val-permille`). `--max-chars` trains on a deterministic sample of them (whole documents
of lowest text-hash rank, up to that many characters) to bound the time. The result is a
Hugging Face `tokenizers` JSON file for `data.tokenizer=FILE`: ByteLevel pre-tokenizer and
decoder (every string encodes, decode(encode(text)) == text), BPE merges, and one special
token, `<|endoftext|>` (id 0), the document separator.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from mohge_jax import data

EOS_TOKEN = "<|endoftext|>"


def training_texts(source: str, *, val_permille: int, max_chars: int | None = None) -> list[str]:
  """The distinct training-split documents of `source`, in source order; with max_chars,
  the ones of lowest hash rank that fit (a sample of the whole corpus, not its first files)."""
  seen: set[bytes] = set()
  docs: list[tuple[bytes, str]] = []
  for _, text in data.iter_documents(source):
    digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
    if digest in seen or data.is_validation(text, val_permille):
      continue
    seen.add(digest)
    docs.append((digest, text))
  if max_chars is not None:
    keep, total = set(), 0
    for digest, text in sorted(docs):
      if total + len(text) <= max_chars:
        keep.add(digest)
        total += len(text)
    docs = [(d, t) for d, t in docs if d in keep]
  if not docs:
    raise ValueError(f"data source {source!r} has no training documents to learn from")
  return [text for _, text in docs]


def train(texts: Iterable[str], vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` ids, EOS_TOKEN first."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if vocab_size < 257 + 1:
    raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 258 ids "
                     "(256 bytes, the separator and one merge)")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                special_tokens=[EOS_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  texts = list(texts)
  tok.train_from_iterator(texts, trainer, length=len(texts))
  return tok


def train_file(source: str, vocab_size: int, out: str | Path, *, val_permille: int,
               max_chars: int | None = None) -> dict:
  """Trains on `source`'s training split and saves to `out`; returns what it did."""
  t0 = time.perf_counter()
  texts = training_texts(source, val_permille=val_permille, max_chars=max_chars)
  tok = train(texts, vocab_size)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(out))
  return dict(source=source, vocab_size=tok.get_vocab_size(), val_permille=val_permille,
              max_chars=max_chars, documents=len(texts), chars=sum(map(len, texts)),
              seconds=time.perf_counter() - t0, path=str(out))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m mohge_jax.tokenizer", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a byte-level BPE on a source's training split")
  t.add_argument("--source", required=True,
                 help="data.source: embedded, site-packages, paths or globs (comma-separated)")
  t.add_argument("--vocab", type=int, default=8192, help="vocabulary size, separator included")
  t.add_argument("--out", required=True, help="the tokenizer JSON file to write")
  t.add_argument("--val-permille", type=int, default=10,
                 help="the data's validation share (documents on that side are never seen)")
  t.add_argument("--max-chars", type=int, default=None,
                 help="train on a deterministic sample of at most this many characters")
  args = p.parse_args(argv)
  try:
    info = train_file(args.source, args.vocab, args.out, val_permille=args.val_permille,
                      max_chars=args.max_chars)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {info['path']}: vocabulary {info['vocab_size']}, trained on "
        f"{info['documents']:,} training documents ({info['chars']:,} characters) of "
        f"{info['source']!r} in {info['seconds']:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
