"""Text corpora and fixed-length token contexts.

The embedded default is built offline from the running Python's standard
library (source with its docstrings and comments) and ``pydoc_data.topics``:
every machine has it, and it is the same for a given Python. ``--dataset``
streams a Hugging Face dataset; ``--data`` reads local text, JSONL or parquet.
Documents are split into train and held-out by a hash of their text, so every
corpus has a held-out part that training never sees.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import NnsightSaeError

HELD_OUT_EVERY = 20  # one document in 20 is held out
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


class CorpusError(NnsightSaeError):
    """An empty or unreadable dataset, or a missing text column."""


def _held_out(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8", "replace")) % HELD_OUT_EVERY == 0


def stdlib_documents() -> list[tuple[str, str]]:
    """(source, text) for the embedded corpus, in a fixed, well-mixed order
    (sorted by a hash of the relative path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        try:
            docs.append((str(rel), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    import pydoc_data.topics

    docs += [(f"pydoc_data.topics:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    docs.sort(key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
    return docs


def stdlib_corpus(split: str = "train"):
    """The embedded corpus as a ``datasets.Dataset`` with columns text, source."""
    import datasets

    docs = [(s, t) for s, t in stdlib_documents() if _held_out(t) == (split != "train")]
    return datasets.Dataset.from_dict({"text": [t for _, t in docs], "source": [s for s, _ in docs]})


def load_corpus(*, dataset: str | None = None, data: str | None = None, split: str = "train",
                text_column: str = "text", held_out: bool = False):
    """A Dataset or IterableDataset of documents.

    dataset: a Hugging Face dataset name, streamed (needs the network).
    data: a local .txt (one document per blank-line-separated block), .jsonl/.json or .parquet file.
    Neither: the embedded standard-library corpus. held_out selects the held-out documents.
    """
    if dataset and data:
        raise CorpusError("give --dataset or --data, not both")
    if not dataset and not data:
        return stdlib_corpus("test" if held_out else "train")
    import datasets

    try:
        if data:
            path = Path(data)
            if not path.is_file():
                raise CorpusError(f"no such data file: {data}")
            if path.suffix in (".jsonl", ".json"):
                ds = datasets.load_dataset("json", data_files=str(path), split="train")
            elif path.suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            else:
                blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
                ds = datasets.Dataset.from_dict({"text": [b for b in blocks if b]})
                text_column = "text"
        else:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
    except CorpusError:
        raise
    except Exception as e:
        raise CorpusError(f"cannot read {'--data ' + data if data else '--dataset ' + dataset}: {e}") from e
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if text_column not in columns:
        raise CorpusError(f"text column {text_column!r} not found; columns: {', '.join(columns)}")
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds.filter(lambda row: bool(row["text"]) and _held_out(row["text"]) == held_out)


def _token_stream(texts: Iterable[str], tokenizer, batch: int = 64) -> Iterator[list[int]]:
    """Token ids of each document, without any BOS the tokenizer adds, EOS-terminated."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    buffer = []
    for text in texts:
        buffer.append(text)
        if len(buffer) == batch:
            yield from _encode(buffer, tokenizer, bos, eos)
            buffer = []
    if buffer:
        yield from _encode(buffer, tokenizer, bos, eos)


def _encode(texts, tokenizer, bos, eos):
    for ids in tokenizer(texts, add_special_tokens=False).input_ids:
        yield ids + ([eos] if eos is not None else [])


def adds_bos(tokenizer) -> bool:
    """Whether the model expects a BOS token first (its tokenizer adds one)."""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def contexts(corpus, tokenizer, ctx_len: int, n_tokens: int | None = None,
             max_positions: int | None = None) -> torch.Tensor:
    """Fixed-length contexts (n, ctx_len) cut from the concatenated documents.

    If the model expects a BOS token each context starts with one. n_tokens:
    stop once this many tokens are collected (rounded up to whole contexts).
    """
    if ctx_len < 2:
        raise CorpusError(f"context length must be at least 2, got {ctx_len}")
    if max_positions is not None and ctx_len > max_positions:
        raise CorpusError(f"context length {ctx_len} is longer than the model allows ({max_positions})")
    bos = adds_bos(tokenizer)
    body = ctx_len - 1 if bos else ctx_len
    want = None if n_tokens is None else -(-n_tokens // ctx_len)
    rows, pending = [], []
    texts = (row["text"] for row in corpus)
    for ids in _token_stream(texts, tokenizer):
        pending.extend(ids)
        while len(pending) >= body:
            rows.append(([tokenizer.bos_token_id] if bos else []) + pending[:body])
            pending = pending[body:]
            if want is not None and len(rows) >= want:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        raise CorpusError("the corpus is empty: not one full context of tokens")
    if want is not None and len(rows) < want:
        raise CorpusError(f"the corpus holds only {len(rows) * ctx_len} tokens; {n_tokens} were asked for")
    return torch.tensor(rows, dtype=torch.long)
