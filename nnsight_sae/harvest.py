"""Activations harvested through nnsight traces.

``harvest`` runs the model over token contexts, reads every requested site in
one pass, stops the forward pass after the deepest one, and yields the rows
with padding (and optionally BOS) dropped. ``ActivationStore`` writes them to
disk once (rows aligned across sites, so transcoders get input/output pairs)
and serves shuffled batches through a bounded buffer, in an order fixed by
(seed, epoch), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import nnsight
import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_folder
from .errors import NnsightSaeError
from .models import trace_options
from .sites import resolve_site, site_layer

# forward order of the named sites inside one layer
_ORDER = {"resid_pre": 0, "attn_z": 1, "head_out": 1, "attn_out": 2, "resid_mid": 3, "mlp_in": 4, "mlp_post": 5,
          "mlp_out": 6, "resid_post": 7}


class HarvestError(NnsightSaeError):
    """Bad harvesting settings (buffer larger than memory, sites out of order)."""


def forward_order(sites: list[str]) -> list[str]:
    """Named sites sorted in the order the forward pass reaches them; raw sites last, as given."""
    named = [s for s in sites if site_layer(s) is not None]
    raw = [s for s in sites if site_layer(s) is None]
    return sorted(dict.fromkeys(named), key=lambda s: (site_layer(s), _ORDER[s.split(".")[0]])) + raw


def harvest(model, sites: list[str], tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
            batch_size: int = 8, drop_bos: bool = False, progress: bool = True) -> Iterator[dict]:
    """Yield {site: rows} per batch of contexts; rows are (n, d) (head_out: (n, n_heads, d)),
    with padded positions (and BOS if drop_bos) removed."""
    ordered = [resolve_site(model, s) for s in forward_order(sites)]
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    bar = tqdm(total=tokens.numel(), desc="harvest", unit="tok", disable=not progress, leave=False)
    for start in range(0, len(tokens), batch_size):
        ids = tokens[start:start + batch_size]
        mask = attention_mask[start:start + batch_size]
        with torch.no_grad(), model.trace({"input_ids": ids, "attention_mask": mask}, **trace_options(model)) as tracer:
            saved = nnsight.save([])  # made and saved inside: only saved values come back from NDIF
            for site in ordered:
                saved.append(site.read())
            tracer.stop()
        keep = mask.bool()
        if drop_bos:
            keep[:, 0] = False
        keep = keep.to(saved[0].device)
        yield {site.name: x.detach()[keep].float().cpu() for site, x in zip(ordered, saved)}
        bar.update(ids.numel())
    bar.close()


def _memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ActivationStore:
    """Harvested activations on disk: one float32 file per site, rows aligned."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.n_rows: int = meta["n_rows"]
        self.shapes: dict[str, list[int]] = meta["shapes"]
        self.info: dict = meta.get("info", {})
        self._arrays = {s: np.memmap(self.folder / self._file(s), dtype=np.float32, mode="r",
                                     shape=(self.n_rows, *shape)) for s, shape in self.shapes.items()}

    @staticmethod
    def _file(site: str) -> str:
        return hashlib.sha1(site.encode()).hexdigest()[:12] + ".f32"

    @property
    def sites(self) -> list[str]:
        return list(self.shapes)

    @classmethod
    def build(cls, folder, model, sites: list[str], tokens: torch.Tensor, *, batch_size: int = 8,
              drop_bos: bool = False, info: dict | None = None, progress: bool = True) -> "ActivationStore":
        """Harvest into ``folder`` (written under a temp name, then renamed)."""
        with atomic_folder(folder) as tmp:
            files, shapes, n_rows = {}, {}, 0
            for rows in harvest(model, sites, tokens, batch_size=batch_size, drop_bos=drop_bos,
                                progress=progress):
                for site, x in rows.items():
                    if site not in files:
                        files[site] = open(tmp / cls._file(site), "wb")
                        shapes[site] = list(x.shape[1:])
                    files[site].write(x.contiguous().numpy().tobytes())
                n_rows += len(next(iter(rows.values())))
            for f in files.values():
                f.close()
            (tmp / "meta.json").write_text(json.dumps({"n_rows": n_rows, "shapes": shapes, "info": info or {}}))
        return cls(folder)

    @classmethod
    def cached(cls, model, sites, tokens, *, cache_root, key_info: dict, **kw) -> "ActivationStore":
        """The store for this model, sites and tokens from ``cache_root``, harvested once; a store
        of more sites on the same tokens serves any of its sites."""
        info = {**key_info, "tokens": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
        digest = hashlib.sha256(json.dumps({**info, "sites": sorted(sites)}, sort_keys=True).encode()).hexdigest()[:20]
        folder = Path(cache_root) / digest
        others = [m.parent for m in sorted(Path(cache_root).glob("[!.]*/meta.json")) if m.parent != folder]
        for candidate in [folder, *others]:
            if (candidate / "meta.json").exists():
                store = cls(candidate)
                # the folder named by the digest is these tokens' (caches older than the stored token digest)
                if set(sites) <= set(store.sites) and (candidate == folder or store.info == info):
                    return store
        return cls.build(folder, model, sites, tokens, info=info, **kw)

    def rows(self, site: str, index) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._arrays[site][index]))

    def _check_buffer(self, buffer_rows: int, sites: list[str]) -> None:
        row_bytes = sum(4 * int(np.prod(self.shapes[s])) for s in sites)
        if buffer_rows * row_bytes > _memory_bytes() // 2:
            raise HarvestError(f"a buffer of {buffer_rows} rows needs {buffer_rows * row_bytes / 2**30:.1f} GiB, "
                               f"over half this machine's memory; lower the buffer size")

    def _buffers(self, batch_size: int, buffer_rows: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
        """Row indices of each buffer in one epoch: random chunks of the store, shuffled."""
        buffer_rows = max(batch_size, min(buffer_rows, self.n_rows))
        chunk = max(1, buffer_rows // 8)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        chunk_order = torch.randperm(-(-self.n_rows // chunk), generator=g)
        per_buffer = max(1, buffer_rows // chunk)
        for b in range(0, len(chunk_order), per_buffer):
            chunks = chunk_order[b:b + per_buffer].sort().values.tolist()
            index = torch.cat([torch.arange(c * chunk, min((c + 1) * chunk, self.n_rows)) for c in chunks])
            yield index[torch.randperm(len(index), generator=g)]

    def batches_per_epoch(self, batch_size: int, *, buffer_rows: int = 65536, seed: int = 0, epoch: int = 0) -> int:
        """How many batches ``batches`` yields for this epoch (a last partial batch per buffer is dropped)."""
        return sum(len(i) // batch_size for i in self._buffers(batch_size, buffer_rows, seed, epoch))

    def batches(self, batch_size: int, *, buffer_rows: int = 65536, seed: int = 0, epoch: int = 0,
                start: int = 0, sites: list[str] | None = None) -> Iterator[dict]:
        """Shuffled batches {site: (batch_size, ...)} for one epoch.

        The buffer holds ``buffer_rows`` rows gathered from randomly chosen chunks
        of the store, shuffled; the order depends only on (seed, epoch).
        ``start`` skips that many batches (for resuming) without reading them.
        """
        sites = sites or self.sites
        self._check_buffer(buffer_rows, sites)
        step = 0
        for index in self._buffers(batch_size, buffer_rows, seed, epoch):
            n_batches = len(index) // batch_size
            if step + n_batches <= start:
                step += n_batches
                continue
            order = index.sort()  # read the buffer in file order, then put it back in shuffled order
            data = {s: self.rows(s, order.values.numpy())[order.indices.argsort()] for s in sites}
            for i in range(n_batches):
                if step >= start:
                    yield {s: v[i * batch_size:(i + 1) * batch_size] for s, v in data.items()}
                step += 1
