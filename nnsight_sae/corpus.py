"""Text corpora and fixed-length token contexts.

Two corpora are embedded, so everything runs offline:

- ``code``: the running Python's standard library (source with its docstrings
  and comments) and ``pydoc_data.topics``; every machine has it, and it is the
  same for a given Python.
- ``prose``: English stories, scenes, letters and diary entries with named
  people, places and dialogue, shipped in ``nnsight_sae/data/prose.jsonl.gz``
  (generated once by the embedded model from seeded prompts: ``tools/generate_prose.py``).
- ``mix``: the two interleaved, about half of the characters each while the prose lasts.

``--dataset`` streams a Hugging Face dataset; ``--data`` reads local text, JSONL
or parquet. Documents are split into train and held-out by a hash of their
text, so every corpus has a held-out part that training never sees.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import NnsightSaeError

HELD_OUT_EVERY = 20  # one document in 20 is held out
EMBEDDED = ("code", "prose", "mix")
DEFAULT_CORPUS = "mix"  # the better SAE on code, prose and the tasks (README, "Data")
PROSE_FILE = Path(__file__).parent / "data" / "prose.jsonl.gz"
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


def prose_documents() -> list[tuple[str, str]]:
    """(prompt, text) for the embedded prose corpus, in the shipped file's order."""
    with gzip.open(PROSE_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [(r["prompt"], r["text"]) for r in rows]


def _mixed(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Documents of a and b interleaved so that each has about half of the characters so far
    (then the rest of the longer one)."""
    out, i, j, chars_a, chars_b = [], 0, 0, 0, 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and chars_a <= chars_b):
            out.append(a[i])
            chars_a += len(a[i][1])
            i += 1
        else:
            out.append(b[j])
            chars_b += len(b[j][1])
            j += 1
    return out


def embedded_corpus(name: str = DEFAULT_CORPUS, split: str = "train"):
    """An embedded corpus (code, prose or mix) as a ``datasets.Dataset`` with columns text, source."""
    import datasets

    check_source(name, None, None)
    if name == "code":
        docs = stdlib_documents()
    elif name == "prose":
        docs = prose_documents()
    else:
        docs = _mixed(prose_documents(), stdlib_documents())
    docs = [(s, t) for s, t in docs if _held_out(t) == (split != "train")]
    return datasets.Dataset.from_dict({"text": [t for _, t in docs], "source": [s for s, _ in docs]})


def embedded_choice(corpus: str | None, dataset: str | None = None, data: str | None = None) -> str | None:
    """The embedded corpus these sources mean: ``corpus``, else the default when neither a
    dataset nor a file is given, else None."""
    return corpus or (None if dataset or data else DEFAULT_CORPUS)


def check_source(corpus: str | None, dataset: str | None, data: str | None) -> None:
    """At most one source of text, and an embedded corpus that exists."""
    if sum(x is not None for x in (corpus, dataset, data)) > 1:
        raise CorpusError("give one of --corpus, --dataset and --data")
    if corpus is not None and corpus not in EMBEDDED:
        raise CorpusError(f"no embedded corpus {corpus!r}; choose one of {', '.join(EMBEDDED)}")


def load_corpus(*, corpus: str | None = None, dataset: str | None = None, data: str | None = None,
                split: str = "train", text_column: str = "text", held_out: bool = False):
    """A Dataset or IterableDataset of documents.

    corpus: an embedded corpus (code, prose or mix; the default when no other source is given).
    dataset: a Hugging Face dataset name, streamed (needs the network).
    data: a local .txt (one document per blank-line-separated block), .jsonl/.json or .parquet file.
    held_out selects the held-out documents.
    """
    check_source(corpus, dataset, data)
    if embedded_choice(corpus, dataset, data):
        return embedded_corpus(embedded_choice(corpus), "test" if held_out else "train")
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
