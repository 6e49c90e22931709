"""
Tensors too many for memory, on disk: a folder of safetensors shards, written once in pieces that
appear whole or not at all, resumable after a kill, read memory-mapped row by row.

It serves every fixed set the training loop reads: the latent caches (a data set encoded once by the
frozen VAE: nothing is augmented, so per-step decoding and VAE work would only keep a GPU waiting) and
the reflow pairs (noise, latent, caption) that sample.py generates.

    folder/<prefix>_00000.safetensors    rows [0, S)       {name: (n, ...)} + metadata
    folder/<prefix>_00001.safetensors    rows [S, 2S)      ...

- A shard's metadata holds `rows`, the folder's `key` (what the rows were made from: a cache is only
  reused for the same checkpoint, data, normalisation and resolution) and any per-row strings
  (captions) as JSON. A shard whose header, row count or key does not match is torn or foreign:
  `build` removes and regenerates it, `ShardedRows` refuses to read it.
- Shards are written to `<name>.tmp<pid>` and renamed, so a kill leaves whole shards and temporary
  files, which the next `build` removes. Shard k is made by rank k % world: several GPUs build one set
  together, and each reads only the rows its own batches need.
- Reading uses safetensors' memory map: a row costs a page-in, not a load of the set. Peak memory
  stays flat in the number of rows (a few open shards are kept, least recently used first out).
"""
import glob
import json
import os
import time
from collections import OrderedDict

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

OPEN_SHARDS = 64        # shards kept open (memory-mapped) at once by a reader


def shard_path(folder, prefix, k):
    return os.path.join(folder, f"{prefix}_{k:05d}.safetensors")


def write_shard(path, tensors, key="", strings=None, metadata=None):
    """One shard, atomically: tensors {name: (n, ...)} with equal n; strings {name: n strings}."""
    n = {t.shape[0] for t in tensors.values()}
    if len(n) != 1:
        raise ValueError(f"write_shard {path}: tensors have different row counts {sorted(n)}")
    n = n.pop()
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    for name, values in (strings or {}).items():
        if len(values) != n:
            raise ValueError(f"write_shard {path}: {len(values)} {name} for {n} rows")
        meta["strings." + name] = json.dumps(list(values))
    meta.update(rows=str(n), key=key)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shard_rows(path, key=None):
    """The row count of a whole shard (made with `key`, when given), else None (missing, torn, foreign)."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            rows = int(meta["rows"])
            if any(f.get_slice(k).get_shape()[0] != rows for k in f.keys()):
                return None
    except Exception:          # missing, cut short or not safetensors: regenerate, never read
        return None
    return rows if key is None or meta.get("key") == key else None


def remove_temporaries(folder):
    """Temporary files a killed writer left behind (`*.tmp<pid>`): they can be gigabytes."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), "*.tmp[0-9]*")):
        os.remove(tmp)


def missing_shards(folder, prefix, num, shard_size, key=None, remove=True):
    """Indices of the shards of rows [0, num) that are not on disk whole; torn ones are removed (remove=True)."""
    if num < 1 or shard_size < 1:
        raise ValueError(f"need num >= 1 and shard_size >= 1, got {num} and {shard_size}")
    todo = []
    for k in range((num + shard_size - 1) // shard_size):
        path = shard_path(folder, prefix, k)
        if shard_rows(path, key) != min(shard_size, num - k * shard_size):
            if remove and os.path.exists(path):
                os.remove(path)
            todo.append(k)
    return todo


def build(folder, prefix, num, shard_size, make, key="", metadata=None, rank=0, world=1, desc=None, wait=False):
    """Make the missing shards of rows [0, num) that belong to this rank (k % world == rank).
    make(indices) -> (tensors {name: (len(indices), ...)}, strings {name: [...]}) for those rows.
    Resumable: whole shards are kept, so a rerun after a kill does only what is left. With wait=True and
    several ranks it returns once every rank's shards are on disk: it polls the folder rather than meeting the
    others in a collective, which NCCL's watchdog would end if one rank's share took long (torchrun ends
    all ranks if one dies). Returns the count made here."""
    os.makedirs(folder, exist_ok=True)
    if rank == 0:
        remove_temporaries(folder)
    todo = [k for k in missing_shards(folder, prefix, num, shard_size, key) if k % world == rank]
    for k in tqdm(todo, desc=desc or f"{prefix} shards", disable=rank != 0 or not todo):
        idx = list(range(k * shard_size, min(num, (k + 1) * shard_size)))
        tensors, strings = make(idx)
        write_shard(shard_path(folder, prefix, k), tensors, key, strings, metadata)
    while wait and world > 1 and missing_shards(folder, prefix, num, shard_size, key, remove=False):
        time.sleep(2)
    return len(todo)


class ShardedRows:
    """Rows of a whole, contiguous set of shards, memory-mapped: rows(idx) gathers any rows."""

    def __init__(self, folder, prefix, key=None):
        paths = sorted(glob.glob(os.path.join(glob.escape(folder), f"{prefix}_[0-9]*.safetensors")))
        if not paths:
            raise FileNotFoundError(f"no {prefix}_*.safetensors shards in {folder}")
        expected = [shard_path(folder, prefix, k) for k in range(len(paths))]
        if paths != expected:
            gap = next(e for e, p in zip(expected, paths + [None]) if e != p)
            raise ValueError(f"{folder}: shard {os.path.basename(gap)} is missing; rerun the command that made "
                             f"the folder (it regenerates only what is missing)")
        counts = [shard_rows(p, key) for p in paths]
        bad = [os.path.basename(p) for p, c in zip(paths, counts) if c is None]
        if bad:
            raise ValueError(f"{folder}: shard(s) {bad[:3]} are cut short, unreadable or from other settings; "
                             f"rerun the command that made the folder to regenerate them")
        self.paths, self.counts = paths, counts
        self.starts = torch.tensor([0] + counts).cumsum(0)      # first row of each shard, then the total
        with safe_open(paths[0], framework="pt") as f:
            self.metadata = f.metadata()
            self.names = list(f.keys())
        self._open = OrderedDict()

    def __len__(self):
        return int(self.starts[-1])

    def _shard(self, k):
        if k in self._open:
            self._open.move_to_end(k)
        else:
            if len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)
            self._open[k] = (safe_open(self.paths[k], framework="pt"), {})   # (handle, parsed strings)
        return self._open[k]

    def _locate(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row {int(idx.max())} out of range for {len(self)} rows")
        k = torch.searchsorted(self.starts, idx, right=True) - 1
        return list(zip(k.tolist(), (idx - self.starts[k]).tolist()))

    def rows(self, indices, names=None):
        """{name: (len(indices), ...)} in the stored dtype, on the CPU (pin and move them as a batch)."""
        where = self._locate(indices)
        return {n: torch.stack([self._shard(k)[0].get_slice(n)[j] for k, j in where]) for n in (names or self.names)}

    def strings(self, name, indices):
        """Per-row strings (e.g. captions) of `indices`."""
        out = []
        for k, j in self._locate(indices):
            handle, parsed = self._shard(k)
            if name not in parsed:
                parsed[name] = json.loads(handle.metadata()["strings." + name])
            out.append(parsed[name][j])
        return out
