"""
Sample from a finetuned run: depth prediction with an aligned ensemble, and its evaluation.

    python sample.py --steps 1                                # newest run in runs/, held-out rendered scenes
    python sample.py --input photo.jpg --steps 4 --ensemble 4 --out depth_out
    python sample.py --eval all --data-root data/eval         # the paper's Table 2 protocol, all five sets

Per input image it writes, as Marigold does: `<name>_pred.npy` (float32 in [0, 1], 0 = near; LOG depth
for a log-normalised model, linear for an affine one: the files say which), `<name>_pred.png`
(16-bit, value·65535), `<name>_pred_colored.png` (Spectral colour map, near = warm red, far = blue) and
`<name>_uncertainty.png` (the ensemble's per-pixel spread), each resized back to the input's size.
"""
import argparse
import glob
import json
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

import data
import data_t2i
import depth_eval
import shards
from checkpoint import (STALE_NAME, STEP_DIR, device_problem, find_checkpoint, load_sd_checkpoint, native_res, parse_hw,
                        run_lora, use_tf32)
from diff2flow import Diff2Flow, conditioned, multires_noise
from lora import bake_lora, companion_path, load_lora, merge_lora, read_metadata
from unet import widen_input_conv

RUNS = "runs"
LORA_FILE = "lora.safetensors"
PREVIEW_SAMPLES = 8        # samples in a straightness preview image
# ColorBrewer "Spectral" (11 classes), red → blue: near depth warm, far depth cool, as Marigold shows it.
SPECTRAL = np.array([[158, 1, 66], [213, 62, 79], [244, 109, 67], [253, 174, 97], [254, 224, 139], [255, 255, 191],
                     [230, 245, 152], [171, 221, 164], [102, 194, 165], [50, 136, 189], [94, 79, 162]], np.float64)


# ---------------------------------------------------------------------------------------------------
# Prediction

@torch.no_grad()
def predict_depth(unet, vae, d2f, context, rgb, objective="diff2flow", steps=4, ensemble=1, seed=0, multires=0.0):
    """rgb (B, 3, H, W) in [-1, 1] → normalised depth (B, 1, H, W) in [-1, 1] and its spread (B, 1, H, W).

    Each of the `ensemble` members starts from its own noise; members agree only up to scale and shift
    (the model predicts relative depth), so they are aligned to each other and merged by the median.
    multires: the multi-resolution noise strength the model was trained with (its run's metadata).
    """
    B = rgb.shape[0]
    with torch.autocast("cuda", torch.bfloat16, enabled=rgb.is_cuda):     # bf16 on a GPU, as training
        img = vae.encode(rgb)                                      # (B, c, h, w)
        img = img.repeat(ensemble, 1, 1, 1)                        # members of image b at b, b + B, ...
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = multires_noise(img.shape, multires, g).to(img.device, torch.float32)
        model = conditioned(unet, context.expand(img.shape[0], -1, -1), concat=img)
        latent = d2f.sample(model, noise, steps, objective)
        depth = vae.decode(latent).mean(1, keepdim=True).clamp(-1, 1)   # 3 channels back to one
    depth = depth.reshape(ensemble, B, 1, *depth.shape[-2:]).float().cpu()
    if ensemble == 1:
        return depth[0], torch.zeros_like(depth[0])
    merged = [depth_eval.ensemble_align(depth[:, b]) for b in range(B)]
    return torch.stack([m for m, _ in merged]).clamp(-1, 1), torch.stack([s for _, s in merged])


def processing_size(h, w, long_edge, multiple):
    """Resize (h, w) so its long edge is `long_edge`, both sides a multiple of `multiple` (the UNet's
    total downsampling in pixels): any aspect ratio works."""
    scale = long_edge / max(h, w)
    return max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple)


def pixel_multiple(unet, vae):
    return 2 ** (len(vae.cfg.ch_mult) - 1) * 2 ** (len(unet.cfg.channel_mult) - 1)


# ---------------------------------------------------------------------------------------------------
# Validation on held-out data (train.py's), with a preview image

def evaluate_heldout(unet, vae, d2f, context, dataset, objective, steps, norm="log", preview=None, ensemble=1, multires=0.0):
    """Held-out AbsRel/δ1 of the model (train.py's validation), and a preview PNG: input | truth | prediction."""
    device = next(unet.parameters()).device

    def predict(rgb):
        return predict_depth(unet, vae, d2f, context, rgb.to(device), objective, steps, ensemble, multires=multires)[0]

    scores = depth_eval.evaluate(predict, dataset, space=depth_eval.alignment_space(norm), desc="validate")
    if preview:
        items = [dataset[i] for i in range(min(4, len(dataset)))]
        pred = predict(torch.stack([it["rgb"] for it in items]))
        rows = []
        for it, p in zip(items, pred):
            truth = data.normalize_depth(it["depth"], it["valid"], norm)[0]
            rows.append(np.concatenate([rgb_to_uint8(it["rgb"]), colorize(truth[0], it["valid"][0]),
                                        colorize(p[0])], axis=1))
        save_png(preview, np.concatenate(rows, axis=0))
    return scores



# ---------------------------------------------------------------------------------------------------
# Images

def colorize(x, valid=None):
    """Normalised depth in [-1, 1] (near = -1) → (H, W, 3) uint8 Spectral: near red, far blue; invalid black."""
    v = ((np.asarray(x, np.float64) + 1) / 2).clip(0, 1) * (len(SPECTRAL) - 1)
    i = np.minimum(v.astype(int), len(SPECTRAL) - 2)
    w = (v - i)[..., None]
    rgb = SPECTRAL[i] * (1 - w) + SPECTRAL[i + 1] * w
    if valid is not None:
        rgb[~np.asarray(valid, bool)] = 0
    return rgb.round().astype(np.uint8)


def rgb_to_uint8(rgb):
    """(3, H, W) in [-1, 1] → (H, W, 3) uint8."""
    return ((rgb.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def save_png(path, array):
    """uint8 (H, W[, 3]) or uint16 (H, W) → PNG (uint16 becomes mode I;16), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def write_depth_outputs(out_dir, name, pred01, spread, norm):
    """Marigold's outputs for one image: .npy in [0, 1], 16-bit PNG, coloured PNG, uncertainty PNG."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name)
    tmp = f"{stem}_pred.npy.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, pred01.astype(np.float32))
    os.replace(tmp, f"{stem}_pred.npy")
    save_png(f"{stem}_pred.png", (pred01 * 65535).round().astype(np.uint16))
    save_png(f"{stem}_pred_colored.png", colorize(pred01 * 2 - 1))
    unc = spread / max(spread.max(), 1e-8)
    save_png(f"{stem}_uncertainty.png", (unc * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------------
# Loading a run

def newest_run(root=RUNS, task="depth"):
    """The run folder under runs/ (train.py's default output folder) whose newest complete checkpoint of
    `task` was written last (step folders, temporary and half-deleted ones are not runs of their own)."""
    runs = set()
    for f in glob.glob(os.path.join(root, "**", LORA_FILE), recursive=True):
        parts = os.path.relpath(f, root).split(os.sep)[:-1]
        if any(STALE_NAME.search(p) for p in parts):
            continue
        while parts and STEP_DIR.match(parts[-1]):     # runs/depth/ckpt_000200/lora.safetensors: run runs/depth
            parts.pop()
        runs.add(os.path.join(root, *parts))
    found = {}
    for run in runs:
        path = run_lora(run)
        if os.path.exists(path) and read_metadata(path).get("diff2flow.task", task) == task:
            found[run] = os.path.getmtime(path)
    if not found:
        raise FileNotFoundError(f"no trained {task} run under {root}/ (looked for {LORA_FILE}): run "
                                f"`python train.py --task {task}` first, or pass --run")
    return max(found, key=found.get)


class Loaded:
    """What sampling needs: the (finetuned) UNet, the VAE, the text encoder (None for the tiny prior),
    the Diff2Flow maps, the empty-prompt context, the objective and the run's metadata."""

    def __init__(self, unet, vae, text_encoder, d2f, context, objective, meta):
        self.unet, self.vae, self.text_encoder, self.d2f = unet, vae, text_encoder, d2f
        self.context, self.objective, self.meta = context, objective, meta

    def encode(self, prompts):
        """Prompts → (B, 77, C) contexts; the tiny prior has no text encoder and is unconditional."""
        if self.text_encoder is None:
            return self.context.expand(len(prompts), -1, -1)
        with torch.no_grad():
            return self.text_encoder.encode(prompts).to(self.context.device, self.context.dtype)


def load_lora_run(run=None, ckpt=None, device="cpu"):
    """Base checkpoint + a run's LoRA (and companion file); run=None gives the untouched prior, sampled
    through Diff2Flow on its own schedule."""
    meta = {}
    if run is not None:
        path = run_lora(run)             # a run folder: the LoRA of its newest complete checkpoint
        if not os.path.exists(path):
            raise FileNotFoundError(f"no LoRA file at {path}: pass a run folder written by train.py or its lora.safetensors")
        meta = read_metadata(path)
        if "diff2flow.objective" not in meta:
            raise ValueError(f"{path} has no diff2flow metadata (objective, prediction type): was it written by train.py?")
    base = ckpt or find_checkpoint(None)[0]
    if run is not None and ckpt is None and os.path.basename(base) != meta.get("diff2flow.base_checkpoint", os.path.basename(base)):
        print(f"note: {run} was trained on {meta['diff2flow.base_checkpoint']}, loading it onto {base}")
    sd = load_sd_checkpoint(base, prediction=meta.get("diff2flow.prediction_type"))
    unet = sd.unet
    if run is not None:
        widen_input_conv(unet, int(meta.get("diff2flow.unet_in_channels", unet.cfg.in_channels)))
        load_lora(path, unet)
        # inference only: fold the LoRA into the weights, so no layer runs its branch (rank-64 depth
        # prediction on the tiny prior: 18% faster), and keep no copy to unmerge (no extra memory)
        merge_lora(unet, keep_copy=False)
    d2f = Diff2Flow(sd.prediction, meta.get("diff2flow.zero_snr") == "True")
    meta.setdefault("diff2flow.family", sd.family)
    if "diff2flow.res" in sd.metadata:            # a tiny prior's own size: what its runs default to
        meta.setdefault("diff2flow.res", sd.metadata["diff2flow.res"])
    for m in (unet, sd.vae, sd.text_encoder):
        if m is not None:
            m.eval().requires_grad_(False).to(device)
    return Loaded(unet, sd.vae, sd.text_encoder, d2f, sd.empty_context().to(device),
                  meta.get("diff2flow.objective", "diff2flow"), meta)


# ---------------------------------------------------------------------------------------------------
# Text-to-image, reflow pairs, and how straight the trajectories are

PAIR_STEPS, PAIR_CFG = 40, 7.5     # the paper's reflow pairs (appendix B): 40 Euler steps at CFG 7.5
PAIR_SHARD = 256                   # pairs per shard file (1.8 M pairs: ~7k files, each resumable on its own)
INIT_LORA = "init_lora.safetensors"   # a reflow run's copy of the LoRA it started from (train.py --init-lora)


def sampling_autocast(device):
    """bf16 autocast for sampling on CUDA; the CPU samples in fp32 (bf16 measured slower there)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def torchrun_rank():
    """(rank, world, local rank) under torchrun (its RANK/WORLD_SIZE/LOCAL_RANK), else (0, 1, 0). Pair
    generation needs no process group: ranks split the shards by index and meet on the file system."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world}): launch with torchrun")
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def apply_init_lora(unet, path):
    """Fold a LoRA (and its companion file) into the UNet's plain weights: the model a reflow starts from."""
    meta = load_lora(path, unet)
    bake_lora(unet)
    unet.requires_grad_(False)
    return meta


def init_lora_files(path):
    """The files of a LoRA (the kohya file and, when present, its companion) and their sha256."""
    files = [f for f in (path, companion_path(path)) if os.path.exists(f)]
    return files, data_t2i.file_sha256(*files)


def find_init_lora(run, meta):
    """The LoRA a run was initialised from, by its sha256: the run folder's copy, else the recorded path."""
    want, recorded = meta["diff2flow.init_lora_sha256"], meta.get("diff2flow.init_lora", "")
    folder = run if os.path.isdir(run) else os.path.dirname(run)      # a run folder, or a LoRA in ckpt_<step>/
    candidates = [os.path.join(folder, INIT_LORA), os.path.join(os.path.dirname(folder), INIT_LORA), recorded]
    for c in candidates:
        if c and os.path.exists(c) and init_lora_files(c)[1] == want:
            return c
    raise FileNotFoundError(f"{run} was trained on top of --init-lora {recorded} (sha256 {want[:12]}...), and neither "
                            f"{candidates[0]} nor that file exists with this hash: put the original LoRA back there")


def load_run(run=None, ckpt=None, device="cpu"):
    """A run as it trained: load_lora_run, plus the LoRA it started from (train.py --init-lora, e.g. a
    reflow of a Diff2Flow finetune), for every task: the run's own file holds
    only what its training changed, so the init LoRA is folded in beside it (the sum is the same in either
    order), except on weights the run stores in full, which already include it."""
    loaded = load_lora_run(run, ckpt, device)
    if "diff2flow.init_lora_sha256" not in loaded.meta:
        return loaded
    path = find_init_lora(run, loaded.meta)
    unet = loaded.unet
    full = set(filter(None, loaded.meta.get("diff2flow.full_train", "").split(",")))
    if full >= {n for n, _ in unet.named_parameters()}:     # a full finetune stores every weight
        return loaded
    kept = {n: p.detach().clone() for n, p in unet.named_parameters() if n in full}
    bake_lora(unet)                    # the run's LoRA is merged already; plain layers, so the init can load
    apply_init_lora(unet, path)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if n in kept:
                p.copy_(kept[n])
    return loaded


def sample_noise(shape, seed, indices):
    """Noise for samples `indices`, each from its own seed: sample i is the same whoever draws it, so a
    resumed pair generation, another rank or a subset of prompts reproduces exactly."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in indices])


@torch.no_grad()
def generate(unet, d2f, context, noise, steps, objective="diff2flow", uncond=None, cfg=1.0, batch=None):
    """Latents (fp32) from noise, `batch` samples at a time (default: all); CFG on the raw output when uncond
    is given and cfg != 1. bf16 autocast on CUDA, fp32 on the CPU."""
    batch, out = batch or len(noise), []
    with sampling_autocast(noise.device):
        for i in range(0, len(noise), batch):
            part = slice(i, i + batch)
            model = conditioned(unet, context[part], uncond_context=None if uncond is None else uncond[part], cfg_scale=cfg)
            out.append(d2f.sample(model, noise[part], steps, objective).float())
    return torch.cat(out)


@torch.no_grad()
def decode(vae, latents, batch=8):
    """Latents → images (B, 3, H, W) in [-1, 1], fp32 on the CPU; bf16 autocast on CUDA."""
    out = []
    with sampling_autocast(latents.device):
        for i in range(0, len(latents), batch):
            out.append(vae.decode(latents[i:i + batch]).float().clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def straightness(unet, vae, d2f, context, noise, objective="diff2flow", few=2, many=25, preview=None):
    """How far `few` Euler steps land from `many` steps from the same noise (mean squared latent
    distance), and the samples' spread (mean per-dimension std across samples) for both: a model that
    collapsed to one output is "straight" too, so the spread must stay near the many-step spread."""
    x_few = generate(unet, d2f, context, noise, few, objective)
    x_many = generate(unet, d2f, context, noise, many, objective)
    res = dict(distance=float(((x_few - x_many) ** 2).mean()), spread=float(x_few.std(0).mean()),
               spread_many=float(x_many.std(0).mean()))
    if preview:   # the first PREVIEW_SAMPLES: few steps above, many steps below
        rows = [torch.cat(list(decode(vae, x[:PREVIEW_SAMPLES])), dim=2) for x in (x_few, x_many)]
        save_png(preview, rgb_to_uint8(torch.cat(rows, dim=1)))
    return res


def save_pairs(loaded, folder, prompts, num, steps=PAIR_STEPS, cfg=PAIR_CFG, shard_size=PAIR_SHARD, seed=0, latent_hw=None,
               batch=16, rank=0, world=1):
    """Reflow pairs (noise, latent, caption) from the model's own ODE, as shards.py shards: resumable (whole
    shards are kept, torn or missing ones regenerated with the same per-sample noise), shard k made by rank
    k % world. A folder holding pairs made with other settings is refused, never overwritten.
    Returns the shards made here."""
    if not prompts:
        raise ValueError("no prompts to generate pairs from")
    shape = (loaded.unet.cfg.out_channels, *latent_hw)
    settings = {"objective": loaded.objective, "steps": steps, "cfg": cfg, "seed": seed,
                "zero_snr": loaded.d2f.zero_snr, "prediction": loaded.d2f.prediction, "res": "x".join(map(str, latent_hw)),
                "base": loaded.meta.get("diff2flow.base_checkpoint", ""), "shard_size": shard_size,
                "model": loaded.meta.get("sshs_model_hash", "prior"), "prompts": data_t2i.digest(prompts)}
    key = data_t2i.digest(settings)
    old = data_t2i.foreign_shard(folder, data_t2i.PAIRS, key)
    if old:
        differ = [f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if str(v) != old.get(k)]
        raise ValueError(f"--save-pairs {folder} holds pairs made with other settings ({'; '.join(differ) or 'another model'}): "
                         f"give a new folder, or the same model, prompts and flags to resume it")
    device = loaded.context.device

    def make(idx):
        captions = [prompts[i % len(prompts)] for i in idx]
        noise = sample_noise(shape, seed, idx).to(device)
        uncond = loaded.context.expand(len(idx), -1, -1)
        x1 = generate(loaded.unet, loaded.d2f, loaded.encode(captions), noise, steps, loaded.objective, uncond, cfg, batch)
        # The FM line t·x1 + (1-t)·x0 must pass through the sampler's true start (DESIGN.md: eps-models)
        x0 = loaded.d2f.flow_noise(noise, x1) if loaded.objective == "diff2flow" else noise
        return {"noise": x0.half().cpu(), "latent": x1.half().cpu()}, {"caption": captions}
    return shards.build(folder, data_t2i.PAIRS, num, shard_size, make, key, settings, rank, world, desc="pair shards")


def png_info(prompt, seed, steps, cfg, objective, model):
    """A1111-style "parameters" text (what image browsers read) plus one key per setting."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: {steps}, Sampler: {'DDIM' if objective == 'diffusion' else 'Diff2Flow Euler'}, "
                                f"CFG scale: {cfg}, Seed: {seed}, Model: {model}")
    for k, v in dict(prompt=prompt, seed=seed, steps=steps, cfg=cfg, objective=objective, model=model).items():
        info.add_text(k, str(v))
    return info


def list_inputs(path):
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(exts))
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(exts)}) in {path}")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"input not found: {path}")
    return [path]


def read_image(path):
    """(3, H, W) in [-1, 1]; a clear error for a file PIL cannot read."""
    try:
        with Image.open(path) as im:
            rgb = data.rgb01(im) * 2 - 1                 # 16-bit files too (data.rgb01)
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError for truncation)
        raise ValueError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="depth", choices=["depth", "t2i"])
    p.add_argument("--run", default=None, help="run folder or LoRA file (default: newest under runs/ for depth; "
                   "the untouched prior for t2i)")
    p.add_argument("--ckpt", default=None, help="base checkpoint (default: as train.py finds it)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples)")
    p.add_argument("--steps", default=None, type=int, help="Euler steps (DDIM steps for a diffusion-objective run; "
                   f"default 4, --eval's protocol's (10 for paper), or {PAIR_STEPS} with --save-pairs (the paper's pairs))")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num", default=8, type=int, help="depth: held-out scenes when no --input; t2i: images (or pairs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    depth = p.add_argument_group("depth")
    depth.add_argument("--input", default=None, help="image or folder (default: held-out rendered scenes)")
    depth.add_argument("--ensemble", default=None, type=int, help="ensemble members per image (default 4)")
    depth.add_argument("--processing-res", default=None, type=int, help="long edge to process at (default: the training "
                       "resolution's; --eval paper processes at 3:4 of it)")
    depth.add_argument("--eval", default=None, choices=depth_eval.EVAL_SETS + ("all",), help="evaluate on a data set, or all five "
                       "(the paper's Table 2 columns; writes <run>/eval_<protocol>.md and .json)")
    depth.add_argument("--data-root", default=None, help="one set: its extracted archive; all: a folder holding "
                       "nyu/ kitti/ eth3d/ scannet/ diode/, each with its <set>_test.txt")
    depth.add_argument("--split", default=None, help="split file of one set (default: <data-root>/<set>_test.txt)")
    depth.add_argument("--protocol", default="paper", choices=list(depth_eval.PROTOCOLS), help="paper: Table 2's (training "
                       "resolution 384x512, 10 steps, ensemble 4, depth-space fit); native: aspect ratio kept, 4 steps, "
                       "fit in the space the model predicts")
    depth.add_argument("--align", default=None, choices=["log", "depth"], help="force the alignment space (default: "
                       "--eval's protocol's; depth space without --eval for an affine model, log space for a log one)")
    depth.add_argument("--eval-res", default=None, help="HxW every --eval input is resized to (default: the protocol's)")
    depth.add_argument("--limit", default=None, type=int, help="--eval only the first N images of each set (a quick look)")
    t2i = p.add_argument_group("text-to-image and reflow pairs")
    t2i.add_argument("--prompt", default="", help="a prompt, or a text file with one prompt per line")
    t2i.add_argument("--cfg", default=PAIR_CFG, type=float, help="classifier-free guidance scale")
    t2i.add_argument("--res", default=None, help="HxW of the images (default: the run's, else its base checkpoint's: 48x64 tiny, 512x512 SD)")
    t2i.add_argument("--save-pairs", default=None, help="write --num reflow pairs to this folder (resumable)")
    t2i.add_argument("--shard-size", default=PAIR_SHARD, type=int, help="pairs per shard file (the unit of resuming)")
    t2i.add_argument("--batch-size", default=16, type=int, help="samples per network call (x2 with CFG)")
    args = p.parse_args(argv)
    for flag in ("steps", "ensemble", "num", "limit", "shard_size", "batch_size", "processing_res"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.task == "t2i" and args.save_pairs and args.steps is None:
        args.steps = PAIR_STEPS                      # the paper's pairs: 40 Euler steps (at CFG 7.5)
    if not (args.task == "depth" and args.eval):    # --eval leaves them to its protocol
        args.steps, args.ensemble = args.steps or 4, args.ensemble or 4
    if args.res is not None:
        try:
            parse_hw(args.res)
        except ValueError as e:
            p.error(str(e))
    for flag in ("out", "save_pairs"):
        path = getattr(args, flag)
        if path and os.path.exists(path) and not os.path.isdir(path):
            p.error(f"--{flag.replace('_', '-')} {path} is a file: give a folder (it is created if missing)")
    if args.run and not os.path.exists(args.run):
        p.error(f"--run {args.run}: no such run folder or LoRA file")
    problem = device_problem(args.device)
    if problem:
        p.error(problem)
    use_tf32(args.device)
    return main_depth(args, p) if args.task == "depth" else main_t2i(args)


def main_t2i(args):
    rank, world, local = torchrun_rank() if args.save_pairs else (0, 1, 0)
    if world > 1 and torch.device(args.device).type == "cuda":
        args.device = f"cuda:{local}"                   # one GPU per rank
        torch.cuda.set_device(args.device)
    loaded = load_run(args.run, args.ckpt, args.device)
    loaded.meta.setdefault("diff2flow.base_checkpoint", os.path.basename(args.ckpt or find_checkpoint(None)[0]))
    if args.res:
        hw = parse_hw(args.res)
    else:               # the run's size (train.py records it), else its base checkpoint's, else SD's 512x512
        long_edge = int(loaded.meta.get("diff2flow.res_long_edge", 0))
        hw = native_res(loaded.meta, (long_edge, long_edge) if long_edge else (512, 512))
    factor = 2 ** (len(loaded.vae.cfg.ch_mult) - 1)
    latent_hw = (hw[0] // factor, hw[1] // factor)
    prompts = data_t2i.read_prompts(args.prompt) if args.prompt else [""]
    if loaded.text_encoder is None and any(prompts):
        print("note: this checkpoint has no text encoder (the tiny prior): prompts are ignored")
    if args.save_pairs:
        made = save_pairs(loaded, args.save_pairs, prompts, args.num, args.steps, args.cfg, args.shard_size, args.seed,
                          latent_hw, args.batch_size, rank, world)
        where = f"rank {rank} of {world}: " if world > 1 else ""
        print(f"{where}{args.save_pairs}: {made} shard(s) written, {args.num} pairs in all ({args.steps} "
              f"{'DDIM' if loaded.objective == 'diffusion' else 'Euler'} steps, CFG {args.cfg})"
              + ("; shards of the other ranks are theirs, rerun the same command to fill any gap" if world > 1 else ""))
        return
    out = args.out or os.path.join(args.run if args.run and os.path.isdir(args.run) else "runs", "samples_t2i")
    idx = list(range(args.num))
    captions = [prompts[i % len(prompts)] for i in idx]
    noise = sample_noise((loaded.unet.cfg.out_channels, *latent_hw), args.seed, idx).to(args.device)
    latents = generate(loaded.unet, loaded.d2f, loaded.encode(captions), noise, args.steps, loaded.objective,
                       loaded.context.expand(len(idx), -1, -1), args.cfg, args.batch_size)
    images = [rgb_to_uint8(x) for x in decode(loaded.vae, latents)]
    model = os.path.basename(args.run or args.ckpt or "prior")
    os.makedirs(out, exist_ok=True)
    for i, (img, caption) in enumerate(zip(images, captions)):
        path = os.path.join(out, f"{args.seed:04d}_{i:03d}.png")
        tmp = path + f".tmp{os.getpid()}.png"
        Image.fromarray(img).save(tmp, pnginfo=png_info(caption, args.seed * 1_000_003 + i, args.steps, args.cfg, loaded.objective, model))
        os.replace(tmp, path)
    cols = min(8, len(images))
    rows = [np.concatenate(images[r:r + cols] + [np.zeros_like(images[0])] * (cols - len(images[r:r + cols])), axis=1)
            for r in range(0, len(images), cols)]
    save_png(os.path.join(out, f"grid_{args.seed:04d}.png"), np.concatenate(rows, axis=0))
    print(f"wrote {len(images)} images and a grid to {out}/ ({args.steps} steps, CFG {args.cfg}, seed {args.seed})")


def main_depth(args, p):
    run = args.run or newest_run()
    loaded = load_run(run, args.ckpt, args.device)
    unet, vae, d2f, context, meta = loaded.unet, loaded.vae, loaded.d2f, loaded.context, loaded.meta
    if meta.get("diff2flow.task", "depth") != "depth":
        raise ValueError(f"{run} is a {meta['diff2flow.task']} run: use --task t2i")
    if args.eval:
        if not args.data_root:
            p.error("--eval needs --data-root (one set's extracted archive, or for all the folder holding one per set)")
        return main_eval(args, run, loaded)
    objective, norm = loaded.objective, meta.get("diff2flow.norm", "log")
    space = depth_eval.alignment_space(norm, args.align)
    out = args.out or os.path.join(run if os.path.isdir(run) else os.path.dirname(run), "samples")
    print(f"run {run}: {objective} objective, {meta['diff2flow.prediction_type']}-prediction, {norm} depth; "
          f"{args.steps} {'DDIM' if objective == 'diffusion' else 'Euler'} steps, ensemble {args.ensemble}; "
          f"alignment in {space} space")
    multiple = pixel_multiple(unet, vae)
    long_edge = args.processing_res or int(meta.get("diff2flow.res_long_edge", max(native_res(meta, (768, 768)))))

    def predict(rgb):   # (B, 3, H, W) at any size → (B, 1, H, W) at that size
        size = processing_size(*rgb.shape[-2:], long_edge, multiple)
        x = F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False) if size != tuple(rgb.shape[-2:]) else rgb
        pred, spread = predict_depth(unet, vae, d2f, context, x.to(args.device), objective, args.steps, args.ensemble,
                                     args.seed, multires=float(meta.get("diff2flow.multires_noise", 0)))
        back = lambda t: F.interpolate(t, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return back(pred), back(spread)

    if args.input:
        items = [(os.path.splitext(os.path.basename(f))[0], read_image(f), None) for f in list_inputs(args.input)]
    else:
        h, w = native_res(meta, (384, 512))
        heldout = data.RenderedDepthDataset.split("heldout", args.num, h, w)
        items = [(heldout[i]["name"], heldout[i]["rgb"], heldout[i]) for i in range(len(heldout))]
    scores = []
    for name, rgb, truth in tqdm(items, desc="depth"):
        pred, spread = predict(rgb[None])
        pred01 = ((pred[0, 0].numpy() + 1) / 2).clip(0, 1)
        write_depth_outputs(out, name, pred01, spread[0, 0].numpy(), norm)
        if truth is not None:
            save_png(os.path.join(out, f"{name}_input.png"), rgb_to_uint8(rgb))
            fit = depth_eval.fit_input(pred[0, 0], space, norm)   # --align depth on a log model: DepthFM's exp + min-max first
            scores.append(depth_eval.evaluate_depth(fit, truth["depth"][0], truth["valid"][0], "rendered", space))
    print(f"wrote {len(items)} predictions to {out}/ (*_pred.npy in [0, 1] = {'log' if norm == 'log' else 'linear'} "
          f"depth, near = 0; *_pred.png 16-bit; *_pred_colored.png near = red; *_uncertainty.png)")
    if scores:
        print(f"{len(scores)} held-out scenes: AbsRel {np.mean([s['abs_rel'] for s in scores]):.4f}  "
              f"δ1 {np.mean([s['delta1'] for s in scores]):.4f} (too few scenes to compare models: train.py's final "
              f"table uses 256, beside the mean depth map)")


def main_eval(args, run, loaded):
    """--eval SET|all: the protocol's predictions on each set, per-set metrics and the Table 2 columns beside
    the paper's rows, printed and written next to the run as eval_<label>.md and .json (atomically)."""
    meta, unet, vae = loaded.meta, loaded.unet, loaded.vae
    norm = meta.get("diff2flow.norm", "log")
    multiple = pixel_multiple(unet, vae)
    long_edge = args.processing_res or int(meta.get("diff2flow.res_long_edge", max(native_res(meta, (512, 512)))))
    st = depth_eval.eval_settings(args.protocol, norm, long_edge, multiple, args.steps, args.ensemble, args.align, args.eval_res, args.limit)
    sets = depth_eval.EVAL_SETS if args.eval == "all" else (args.eval,)
    datasets = depth_eval.eval_datasets(sets, args.data_root, args.split)
    spaces = (st["align"], "log" if st["align"] == "depth" else "depth")   # the other fit is free: report both
    multires = float(meta.get("diff2flow.multires_noise", 0))
    print(f"run {run}: {loaded.objective} objective, {meta['diff2flow.prediction_type']}-prediction, {norm} depth")
    print(st["text"])

    def predict(rgb):   # (1, 3, H, W) → normalised prediction (1, 1, h, w) at the processing size
        size = st["size"] or processing_size(*rgb.shape[-2:], long_edge, multiple)
        return predict_depth(unet, vae, loaded.d2f, loaded.context, depth_eval.resize_to(rgb, size).to(args.device), loaded.objective,
                             st["steps"], st["ensemble"], args.seed, multires=multires)[0]

    results, per_image = {}, {}
    for name, ds in datasets.items():
        per = depth_eval.score_images(predict, ds, name, spaces, norm, args.limit, desc=name)
        results[name] = dict(images=len(per[spaces[0]]), metrics={s: depth_eval.mean_metrics(per[s]) for s in spaces})
        per_image[name] = per
        m, paper = results[name]["metrics"][spaces[0]], depth_eval.PAPER_TABLE2["Diff2Flow (paper)"][name]
        print(f"{name} ({results[name]['images']} images): AbsRel {m['abs_rel'] * 100:.1f}  δ1 {m['delta1'] * 100:.1f}  "
              f"(paper's Diff2Flow: {paper[0]} / {paper[1]})")
    folder = args.out or (run if os.path.isdir(run) else os.path.dirname(run))
    stem = os.path.join(folder, f"eval_{st['label']}" + ("" if args.eval == "all" else f"_{args.eval}"))
    text = depth_eval.table2_markdown(results, st, run)
    depth_eval.write_text_atomic(stem + ".md", text)
    record = dict(run=run, settings={k: v for k, v in st.items() if k != "text"}, description=st["text"],
                  sets={n: dict(r, per_image=per_image[n]) for n, r in results.items()},
                  paper_table2=dict(source="paper/diff2flow-paper.txt lines 229-244 (AbsRel, δ1 in %)", rows=depth_eval.PAPER_TABLE2))
    depth_eval.write_text_atomic(stem + ".json", json.dumps(record, indent=1, ensure_ascii=False))
    print("\n" + text + f"\nwrote {stem}.md and {stem}.json")
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
