"""
Text-to-image and reflow data: image folders with captions, and stored (noise, latent, caption) pairs.

Caption folders, as kohya's scripts and most finetuning tools lay them out:
    photos/cat.jpg + photos/cat.txt (one caption per image, same stem)     or
    photos/ + a JSONL manifest, one {"file": "cat.jpg", "text": "a cat"} per line
Images are resized (shorter side, antialiased) and centre-cropped to the training size, and returned
in [-1, 1] as (3, H, W). Caption dropout (10% by default) replaces the caption with "" so the model
also learns the unconditional branch that classifier-free guidance needs.

Reflow pairs are shards `pairs_00000.safetensors`, ... each holding `noise` and `latent` (fp16,
(n, C, h, w)) for samples [k·S, (k+1)·S), with the captions and the generation settings in the
metadata. A shard is written to a temporary name and renamed, so a file either exists whole or not at
all; a shard that does not open or does not hold what its metadata says (a copy cut short) is treated
as missing and regenerated, never trained on.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import data

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD = "pairs_{:05d}.safetensors"


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
# Reflow pairs

def read_shard(path):
    """(noise, latent, captions, metadata) of one shard, or None if it is missing, cut short or inconsistent."""
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            noise, latent = f.get_tensor("noise"), f.get_tensor("latent")
        captions = json.loads(meta["captions"])
    except Exception:          # a torn or foreign file: regenerate rather than train on it
        return None
    if noise.shape != latent.shape or len(captions) != noise.shape[0] or int(meta.get("count", -1)) != noise.shape[0]:
        return None
    return noise, latent, captions, meta


def write_shard(path, noise, latent, captions, metadata=None):
    """One shard, fp16 tensors, written to a temporary name and renamed."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta.update(captions=json.dumps(list(captions)), count=str(noise.shape[0]))
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"noise": noise.detach().cpu().half().contiguous(), "latent": latent.detach().cpu().half().contiguous()},
              tmp, metadata=meta)
    os.replace(tmp, path)


def missing_shards(folder, num, shard_size):
    """Shard indices of [0, num) that are not on disk whole (torn files are removed)."""
    todo = []
    for k in range((num + shard_size - 1) // shard_size):
        path = os.path.join(folder, SHARD.format(k))
        want = min(shard_size, num - k * shard_size)
        got = read_shard(path)
        if got is None or got[0].shape[0] != want:
            if os.path.exists(path):
                os.remove(path)
            todo.append(k)
    return todo


class ReflowPairs(torch.utils.data.Dataset):
    """All whole shards of a pair folder: items dict(noise, latent (float32), caption)."""

    def __init__(self, folder):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"missing reflow pair folder: {folder} (make one with sample.py --save-pairs)")
        names = sorted(n for n in os.listdir(folder) if n.startswith("pairs_") and n.endswith(".safetensors"))
        noise, latent, captions, torn = [], [], [], []
        for n in names:
            got = read_shard(os.path.join(folder, n))
            if got is None:
                torn.append(n)
                continue
            noise.append(got[0])
            latent.append(got[1])
            captions += got[2]
        if torn:
            raise ValueError(f"{folder}: shard(s) {torn[:3]} are cut short or unreadable; rerun the same "
                             f"sample.py --save-pairs command to regenerate them")
        if not noise:
            raise ValueError(f"no pair shards (pairs_*.safetensors) in {folder}")
        self.noise, self.latent, self.captions = torch.cat(noise).float(), torch.cat(latent).float(), captions

    @staticmethod
    def settings(folder):
        """The generation settings (objective, steps, cfg, zero_snr, ...) stored with the first whole shard."""
        for n in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            got = read_shard(os.path.join(folder, n)) if n.startswith("pairs_") else None
            if got is not None:
                return got[3]
        return {}

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return dict(noise=self.noise[i], latent=self.latent[i], caption=self.captions[i])
