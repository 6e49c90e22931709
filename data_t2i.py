"""
Text-to-image and reflow data: image folders with captions, and stored (noise, latent, caption) pairs.

Caption folders, as kohya's scripts and most finetuning tools lay them out:
    photos/cat.jpg + photos/cat.txt (one caption per image, same stem)     or
    photos/ + a JSONL manifest, one {"file": "cat.jpg", "text": "a cat"} per line
Images are resized (shorter side, antialiased) and centre-cropped to the training size, and returned
in [-1, 1] as (3, H, W). Caption dropout replaces a caption with "" so the model also learns the
unconditional branch that classifier-free guidance needs (train.py: 2% on SD, as the official t2i
configs; 10% on the tiny prior).

Both fixed sets live on disk as shards.py folders (fp16, memory-mapped, resumable, shard k made by
rank k % world), so memory stays flat in the number of images or pairs:
    latent cache   latents_00000.safetensors ...  `latent` (n, c, h, w), captions   (cache_latents)
    reflow pairs   pairs_00000.safetensors ...    `noise`, `latent` (n, c, h, w), captions, and the
                                                  generation settings in the metadata (sample.py)
"""
import glob
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import shards

import data

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_rgb(path, size):
    """An image file → (3, H, W) in [-1, 1]: shorter side resized to fit size = (H, W), centre-cropped."""
    try:
        with Image.open(path) as im:
            x = torch.from_numpy(data.rgb01(im) * 2 - 1).permute(2, 0, 1)   # 16-bit files too
    except Exception as e:     # PIL raises several kinds for unreadable or truncated files
        raise ValueError(f"cannot read image {path}: {e}") from None
    h, w = x.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    rh, rw = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    x = F.interpolate(x[None], size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
    return x[:, top:top + size[0], left:left + size[1]].clamp(-1, 1)


class CaptionFolder(torch.utils.data.Dataset):
    """Images with captions from a folder (<stem>.txt beside each image) or a JSONL manifest."""

    def __init__(self, root, size=(512, 512), manifest=None, caption_dropout=0.1, seed=0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"missing image folder: {root}")
        self.root, self.size, self.caption_dropout = root, tuple(size), caption_dropout
        self.rng = np.random.default_rng(seed)
        self.items = self._from_manifest(manifest) if manifest else self._from_folder(root)
        if not self.items:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) in {manifest or root}")

    def _from_folder(self, root):
        items = []
        for name in sorted(os.listdir(root)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            txt = os.path.join(root, stem + ".txt")
            if not os.path.exists(txt):
                raise ValueError(f"image {os.path.join(root, name)} has no caption file {txt} "
                                 f"(write one, or list captions in a JSONL manifest)")
            with open(txt, encoding="utf-8") as f:
                items.append((name, f.read().strip()))
        return items

    def _from_manifest(self, manifest):
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"missing caption manifest: {manifest}")
        items = []
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    items.append((rec["file"], str(rec["text"])))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{manifest} line {n}: expected {{\"file\": ..., \"text\": ...}}, got {line.strip()[:80]!r}") from None
                if not os.path.exists(os.path.join(self.root, rec["file"])):
                    raise FileNotFoundError(f"{manifest} line {n}: image {os.path.join(self.root, rec['file'])} not found")
        return items

    def __len__(self):
        return len(self.items)

    def image(self, i):
        return load_rgb(os.path.join(self.root, self.items[i][0]), self.size)

    def __getitem__(self, i):
        name, caption = self.items[i]
        if self.caption_dropout > 0 and self.rng.random() < self.caption_dropout:
            caption = ""
        return dict(rgb=self.image(i), caption=caption, name=name)


def read_prompts(path_or_prompt):
    """Prompts from a text file (one per line) or a single prompt string; an empty list is an error."""
    if os.path.isfile(path_or_prompt):
        with open(path_or_prompt, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {path_or_prompt} holds no prompts (one per line)")
        return prompts
    return [path_or_prompt]


# ---------------------------------------------------------------------------------------------------
# On disk: the latent cache of a caption folder and the reflow pairs, both shards.py folders

LATENTS, PAIRS = "latents", "pairs"     # shard prefixes: latents_00000.safetensors, pairs_00000.safetensors
CACHE_SHARD = 256                       # images per latent shard (8 MB at 512x512)


def digest(*parts):
    """A short, stable hash of JSON-able parts: the `key` of a shard folder (what its rows were made from)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(*paths):
    """sha256 over the bytes of the files that exist among `paths` (a LoRA file and its companion)."""
    h = hashlib.sha256()
    for p in paths:
        if os.path.exists(p):
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def cache_latents(dataset, encode, folder, key, shard_size=CACHE_SHARD, batch=16, rank=0, world=1, metadata=None):
    """Encode a CaptionFolder once into fp16 latent shards (rows: `latent`, strings: `caption`), resumably,
    `batch` images at a time, so memory holds one batch of images and one shard of latents whatever
    the folder's size. encode(rgb (B, 3, H, W) in [-1, 1]) -> latents (B, c, h, w). Shard k is encoded by
    rank k % world. Returns the shards made here."""
    def make(idx):
        out = []
        for i in range(0, len(idx), batch):
            rgb = torch.stack([dataset.image(j) for j in idx[i:i + batch]])
            with torch.no_grad():
                out.append(encode(rgb).detach().to("cpu", torch.float16))
        return {"latent": torch.cat(out)}, {"caption": [dataset.items[j][1] for j in idx]}
    return shards.build(folder, LATENTS, len(dataset), shard_size, make, key, metadata, rank, world,
                        desc="encoding latents", wait=True)


class LatentCache(shards.ShardedRows):
    """A caption folder's latents, memory-mapped: rows(idx, ["latent"]), strings("caption", idx)."""

    def __init__(self, folder, key):
        super().__init__(folder, LATENTS, key)


class ReflowPairs(shards.ShardedRows):
    """Stored reflow pairs, memory-mapped: rows(idx, ["noise", "latent"]) (fp16), strings("caption", idx),
    and the generation settings (objective, steps, cfg, zero_snr, ...) in `.metadata`."""

    def __init__(self, folder):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"missing reflow pair folder: {folder} (make one with sample.py --save-pairs)")
        try:
            super().__init__(folder, PAIRS)
        except FileNotFoundError:
            raise ValueError(f"no pair shards ({PAIRS}_*.safetensors) in {folder}: make them with sample.py "
                             f"--save-pairs {folder}") from None
        except ValueError as e:
            first = shards.shard_path(folder, PAIRS, 0)
            old = _metadata(first)
            if "count" in old and "rows" not in old:
                raise ValueError(f"{folder}: pairs written by an older sample.py (before shards.py); regenerate "
                                 f"them with sample.py --save-pairs into a new folder") from None
            raise e

    def __getitem__(self, i):
        rows = self.rows([i])
        return dict(noise=rows["noise"][0].float(), latent=rows["latent"][0].float(), caption=self.strings("caption", [i])[0])


def pair_settings(folder):
    """The settings the pairs in `folder` were generated with ({} when there are none yet)."""
    return _metadata(shards.shard_path(folder, PAIRS, 0))


def foreign_shard(folder, prefix, key):
    """The metadata of the first whole shard in `folder` made with another key ({} if none): shards.build
    would delete it as foreign, which for hours of generated pairs is the caller's decision, not ours."""
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), f"{prefix}_[0-9]*.safetensors"))):
        meta = _metadata(path)
        if meta.get("key", key) != key and shards.shard_rows(path) is not None:
            return meta
    return {}


def _metadata(path):
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:         # missing or torn: no settings to read
        return {}
