"""
Finetune Stable Diffusion with the Diff2Flow objective (or the two baselines): one loop for every task.

    python train.py --task depth --lora-rank 64                      # bundled tiny prior, rendered scenes
    python train.py --task depth --ckpt v2-1_768-ema-pruned.safetensors --hypersim DIR --vkitti DIR
    python train.py --task t2i --ckpt v2-1_768-ema-pruned.safetensors --data photos/ --res 512x512
    python train.py --task reflow --pairs pairs/ --init-lora runs/t2i/lora.safetensors   # see sample.py --save-pairs
    torchrun --nproc_per_node 4 train.py --task depth ...             # DDP (nccl on GPU, gloo on CPU)

One step: data.py batch → vae.py encode (cached once for a fixed data set) → diff2flow.py draws t and
noise, builds x_t and the target, calls the UNet through the time/state map and returns the loss for
--objective → AdamW over the LoRA (lora.py) or the full UNet (unet.py). A run folder holds the
LoRA (kohya format, readable by ComfyUI/A1111/diffusers), its companion file of fully trained tensors,
the resumable training state, a JSONL log and preview images.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

import data
import data_t2i
from checkpoint import find_checkpoint, load_sd_checkpoint
from diff2flow import DIFFUSION_CHANGES, OBJECTIVES, Diff2Flow, conditioned, multires_noise
from lora import CONV_IN, CONV_OUT, inject_lora, load_lora, lora_metadata, merge_lora, save_lora
from unet import widen_input_conv

TASKS = ("depth", "t2i", "reflow")
LORA_FILE, STATE_FILE, LOG_FILE = "lora.safetensors", "state.pt", "log.jsonl"
VAL_SCENES = 64          # held-out rendered scenes for validation (disjoint seeds from training)
REPORT_STEPS, REPORT_ENSEMBLE = 2, 4   # depth's final table: what `python sample.py --steps 2` predicts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="depth", help=f"one of {TASKS}")
    p.add_argument("--ckpt", default=None, help="SD single-file checkpoint (.safetensors/.ckpt); default: a known "
                   "SD file in ./ or ./checkpoints, else the bundled tiny prior")
    p.add_argument("--prediction", default=None, choices=["eps", "v"], help="override the prior's prediction type")
    p.add_argument("--objective", default="diff2flow", help=f"one of {OBJECTIVES}")
    p.add_argument("--diffusion-changes", default="", help="ablation: comma list of Diff2Flow's changes "
                   "(continuous, density, weight) added to the diffusion objective; see diff2flow.DIFFUSION_CHANGES")
    p.add_argument("--zero-snr", default=None, type=int, choices=[0, 1],
                   help="zero-terminal-SNR schedule; default on for diff2flow with v-models, off otherwise")
    p.add_argument("--lora-rank", default="64", help="int, fraction of each layer's width (0.2 = the paper's 20%%), or 0 = full finetuning")
    p.add_argument("--lora-alpha", default=None, type=float, help="LoRA alpha; default = rank (scale 1)")
    p.add_argument("--no-full-convs", action="store_true", help="do not train the (widened) first and the last conv in full")
    p.add_argument("--steps", default=None, type=int, help="optimizer steps (default: 1500 on the tiny prior, 20000 on SD)")
    p.add_argument("--batch-size", default=None, type=int, help="per process (default: 8 tiny, 2 SD)")
    p.add_argument("--grad-accum", default=1, type=int)
    p.add_argument("--lr", default=None, type=float, help="peak learning rate (default: 1e-3 LoRA on the tiny prior, 1e-4 LoRA, 3e-5 full)")
    p.add_argument("--warmup", default=50, type=int, help="linear warm-up steps")
    p.add_argument("--decay", default="cosine", choices=["cosine", "none"], help="after warm-up: cosine to 10%% or constant")
    p.add_argument("--weight-decay", default=0.0, type=float)
    p.add_argument("--ema", default=0.0, type=float, help="EMA decay of the trained weights (0 = off); validation and the saved LoRA use the EMA")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA, fp32 on CPU (measured faster there)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (minutes to compile; worth it on a GPU)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--res", default=None, help="training resolution HxW (default: 96x128 tiny, 384x512 SD)")
    p.add_argument("--hypersim", default=None, help="Hypersim root as Marigold preprocesses it")
    p.add_argument("--hypersim-split", default=None, help="its split file (default ROOT/filename_list_train.txt)")
    p.add_argument("--vkitti", default=None, help="Virtual KITTI 2 root")
    p.add_argument("--vkitti-split", default=None, help="its split file (default ROOT/vkitti_train.txt)")
    p.add_argument("--train-scenes", default=2000, type=int, help="rendered training scenes when no data set is given")
    p.add_argument("--data", default=None, help="t2i: image folder with <stem>.txt captions")
    p.add_argument("--manifest", default=None, help="t2i: JSONL manifest {file, text} instead of .txt captions")
    p.add_argument("--caption-dropout", default=0.1, type=float, help="t2i/reflow: share of empty captions (for CFG)")
    p.add_argument("--pairs", default=None, help="reflow: folder of (noise, latent, caption) shards")
    p.add_argument("--init-lora", default=None, help="merge this LoRA into the prior first (reflow a finetuned model)")
    p.add_argument("--val-prompts", default=None, help="t2i/reflow: prompt file or prompt for the preview images")
    p.add_argument("--multires-noise", default=None, type=float, help="depth: Marigold's multi-resolution noise as "
                   "the source, this strength per level (0 = white noise, the method as written; default 0.9 on "
                   "the tiny prior, where white noise does not learn held-out depth, 0 on SD)")
    p.add_argument("--t-density", default=None, help="fm/diff2flow training times: 'uniform' (the method as "
                   "written) or 'logit-normal:LOC[:SCALE]' (SD3's; LOC < 0 trains more near the noise end); default "
                   "logit-normal:-3 for diff2flow depth on the tiny prior, uniform otherwise")
    p.add_argument("--norm", default="log", choices=["log", "affine"], help="depth normalisation (log 1/99%% or affine 2/98%%)")
    p.add_argument("--val-every", default=None, type=int, help="steps between validations (default: steps // 4)")
    p.add_argument("--val-steps", default=4, type=int, help="Euler (or DDIM) steps at validation")
    p.add_argument("--report-scenes", default=256, type=int, help="depth: held-out scenes for the final table "
                   f"(untouched prior and finetuned model, {REPORT_STEPS} steps, ensemble {REPORT_ENSEMBLE}); 0 = none")
    p.add_argument("--save-every", default=200, type=int, help="steps between checkpoints")
    p.add_argument("--out", default=None, help="run folder (default: runs/<task>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-at", default=None, type=int, help="stop (and save) after this step; the schedule still "
                   "spans --steps, so --resume later continues exactly (time-limited jobs)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.task not in TASKS:
        p.error(f"unknown task {args.task!r}: use one of {TASKS}")
    if args.objective not in OBJECTIVES:
        p.error(f"unknown objective {args.objective!r}: use one of {OBJECTIVES}")
    args.diffusion_changes = tuple(c for c in args.diffusion_changes.split(",") if c)
    if args.diffusion_changes and args.objective != "diffusion":
        p.error("--diffusion-changes only applies to --objective diffusion")
    unknown = set(args.diffusion_changes) - set(DIFFUSION_CHANGES)
    if unknown:
        p.error(f"unknown diffusion change(s) {sorted(unknown)}: use any of {DIFFUSION_CHANGES}")
    if args.multires_noise is not None and (args.multires_noise < 0 or (args.multires_noise > 0 and args.task != "depth")):
        p.error(f"--multires-noise {args.multires_noise}: a strength >= 0, for --task depth only")
    if args.report_scenes < 0:
        p.error(f"--report-scenes {args.report_scenes}: a count >= 0 (0 = no final report)")
    if args.t_density is not None:
        try:
            t_density(args.t_density)
        except ValueError as e:
            p.error(str(e))
        if args.t_density != "uniform" and args.objective == "diffusion":
            p.error("--t-density sets the FM times of fm/diff2flow; the diffusion objective draws its own timesteps")
    args.out = args.out or os.path.join("runs", args.task)
    if args.task == "t2i" and not args.data:
        p.error("--task t2i needs --data (an image folder with captions)")
    if args.task == "reflow" and not args.pairs:
        p.error("--task reflow needs --pairs (make them with sample.py --save-pairs)")
    try:
        args.lora_rank = float(args.lora_rank) if "." in args.lora_rank else int(args.lora_rank)
    except ValueError:
        p.error(f"--lora-rank must be an int, a fraction or 0, got {args.lora_rank!r}")
    return args


def t_density(spec):
    """'uniform' -> None; 'logit-normal:LOC[:SCALE]' -> (LOC, SCALE), SCALE 1 by default (Diff2Flow.sample_t)."""
    if spec == "uniform":
        return None
    name, *nums = spec.split(":")
    try:
        values = [float(v) for v in nums]
    except ValueError:
        values = []
    if name != "logit-normal" or len(values) not in (1, 2) or (len(values) == 2 and values[1] <= 0):
        raise ValueError(f"--t-density {spec!r}: use 'uniform' or 'logit-normal:LOC[:SCALE]' (SCALE > 0), "
                         f"e.g. logit-normal:-2")
    return values[0], values[1] if len(values) == 2 else 1.0


# ---------------------------------------------------------------------------------------------------
# The model: prior UNet (+ widened input conv) + LoRA, the frozen VAE, the empty-prompt context

def build(args, log=print):
    ckpt_path, bundled = find_checkpoint(args.ckpt)
    sd = load_sd_checkpoint(ckpt_path, prediction=args.prediction)
    tiny = sd.family == "tiny"                         # any small SD-shaped model gets the small defaults
    unet, vae, text_encoder = sd.unet, sd.vae, sd.text_encoder
    context = sd.empty_context()                        # (1, 77, C): the empty prompt
    prediction = sd.prediction
    if args.init_lora:                                  # e.g. reflow a Diff2Flow-finetuned model
        load_lora(args.init_lora, unet)
        merge_lora(unet)
    zero_snr = args.zero_snr
    if zero_snr is None and args.task == "reflow":      # follow the ODE that made the pairs
        zero_snr = data_t2i.ReflowPairs.settings(args.pairs).get("zero_snr") == "True"
    if zero_snr is None:
        zero_snr = args.objective == "diff2flow" and prediction == "v"
    d2f = Diff2Flow(prediction, bool(zero_snr))
    if args.task == "depth":
        widen_input_conv(unet, 2 * unet.cfg.in_channels)    # [x_noisy, image_latent]
    for m in (unet, vae, text_encoder):
        if m is not None:
            m.requires_grad_(False).eval()
    if args.lora_rank == 0:
        unet.requires_grad_(True)
        n_lora = 0
    else:
        full = () if args.no_full_convs or args.task != "depth" else (CONV_IN, CONV_OUT)
        n_lora = len(inject_lora(unet, args.lora_rank, args.lora_alpha, full_train=full))
    unet.set_options(use_checkpoint=args.grad_checkpointing)
    n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in unet.parameters())
    log(f"prior: {ckpt_path} ({sd.family}, {prediction}-prediction), task {args.task}, objective {args.objective}, "
        f"zero-SNR {'on' if d2f.zero_snr else 'off'}")
    if bundled:
        log("no SD checkpoint given or found: using the bundled tiny prior" + (" and procedurally rendered scenes"
            if args.task == "depth" else "") + " (pass --ckpt v2-1_768-ema-pruned.safetensors and real data for the paper's setting)")
    what = "full finetuning" if args.lora_rank == 0 else f"LoRA rank {args.lora_rank} on {n_lora} layers"
    log(f"{what}: {n_train / 1e6:.2f} M of {n_all / 1e6:.2f} M UNet parameters trained")
    if tiny and args.lora_rank != 0 and isinstance(args.lora_rank, int) and args.lora_rank >= unet.cfg.model_channels:
        log(f"note: rank {args.lora_rank} is at or above the tiny UNet's width ({unet.cfg.model_channels}-"
            f"{unet.cfg.model_channels * max(unet.cfg.channel_mult)} channels): close to full rank here")
    info = dict(ckpt=ckpt_path, tiny=tiny, family=sd.family, prediction=prediction, zero_snr=d2f.zero_snr)
    return unet, vae, text_encoder, context, d2f, info


# ---------------------------------------------------------------------------------------------------
# Depth data: rendered scenes or the real sets, encoded to latents once

def parse_res(res, tiny, square=False):
    if res is None:
        return ((96, 96) if tiny else (512, 512)) if square else ((96, 128) if tiny else (384, 512))
    try:
        h, w = (int(v) for v in res.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--res must look like 384x512, got {res!r}")
    return h, w


def depth_sets(args, hw):
    """(train set, held-out set). Real data when given (Hypersim + Virtual KITTI 2 mixed ~9:1), else scenes."""
    if args.hypersim or args.vkitti:
        sets, probs = [], []
        if args.hypersim:
            split = args.hypersim_split or os.path.join(args.hypersim, "filename_list_train.txt")
            sets.append(data.DepthFileDataset("hypersim", args.hypersim, split, size=hw))
            probs.append(0.9)
        if args.vkitti:
            split = args.vkitti_split or os.path.join(args.vkitti, "vkitti_train.txt")
            sets.append(data.DepthFileDataset("vkitti", args.vkitti, split, size=hw))
            probs.append(0.1)
        train = data.MixedDataset(sets, probs=probs, seed=args.seed)
        heldout = data.RenderedDepthDataset.split("heldout", VAL_SCENES, *hw)
        return train, heldout
    key = (args.train_scenes, hw)
    if key not in _SCENES:   # rendered scenes are cached in memory; keep the data sets for later runs
        _SCENES[key] = (data.RenderedDepthDataset.split("train", args.train_scenes, *hw),
                        data.RenderedDepthDataset.split("heldout", VAL_SCENES, *hw))
    return _SCENES[key]


@torch.no_grad()
def encode_depth_items(vae, items, norm, device):
    """A list of data items → latents: image (B, c, h, w), normalised depth (B, c, h, w), loss mask (B, 1, h, w)."""
    rgb = torch.stack([it["rgb"] for it in items]).to(device)
    depth = torch.stack([it["depth"] for it in items]).to(device)
    valid = torch.stack([it["valid"] for it in items]).to(device)
    x, _, _ = data.normalize_depth(depth, valid, norm)
    img = vae.encode(rgb)
    dep = vae.encode(x.repeat(1, 3, 1, 1))             # depth as a 3-channel image, as Marigold
    factor = rgb.shape[-1] // img.shape[-1]
    return img, dep, data.latent_valid_mask(valid, factor)


_LATENTS = {}   # (checkpoint, data set, normalisation) → latents: runs in one process (results.py) share them
_SCENES = {}


def cache_latents(vae, dataset, norm, device, key=None, batch=16):
    """Encode a fixed data set once (the VAE is frozen): the demo then spends its time in the UNet."""
    if key is not None and key in _LATENTS:
        return _LATENTS[key]
    img, dep, mask = [], [], []
    for i in tqdm(range(0, len(dataset), batch), desc="encoding latents", leave=False):
        out = encode_depth_items(vae, [dataset[j] for j in range(i, min(i + batch, len(dataset)))], norm, device)
        for acc, t in zip((img, dep, mask), out):
            acc.append(t.cpu())
    latents = torch.cat(img), torch.cat(dep), torch.cat(mask)
    if key is not None:
        _LATENTS[key] = latents
    return latents


# ---------------------------------------------------------------------------------------------------
# Tasks: what a batch is, and how a run is validated

class DepthTask:
    """Image → depth: x1 = the depth latent, the image latent concatenated to the UNet's input."""

    def __init__(self, args, vae, context, d2f, info, device, log):
        self.args, self.vae, self.context, self.d2f, self.device = args, vae, context, d2f, device
        hw = info["res"] = parse_res(args.res, info["tiny"])
        self.train_set, self.heldout = depth_sets(args, hw)
        self.report_set = None   # rendered once, kept for the report at the end
        if args.report_scenes > 0:
            self.report_set = data.RenderedDepthDataset.split("heldout", args.report_scenes, *hw)
        self.cached = None
        if isinstance(self.train_set, data.RenderedDepthDataset):
            key = (info["ckpt"], os.path.getmtime(info["ckpt"]), len(self.train_set), hw, args.norm)
            self.cached = cache_latents(vae, self.train_set, args.norm, device, key)
            log(f"training on {len(self.train_set)} rendered scenes at {hw[0]}x{hw[1]}, latents {tuple(self.cached[0].shape[1:])}")

    def batch(self, g):
        if self.cached is not None:
            idx = torch.randint(len(self.cached[0]), (self.args.batch_size,), generator=g)
            img, dep, mask = (t[idx].to(self.device) for t in self.cached)
        else:
            idx = torch.randint(len(self.train_set), (self.args.batch_size,), generator=g).tolist()
            img, dep, mask = encode_depth_items(self.vae, [self.train_set[i] for i in idx], self.args.norm, self.device)
        noise = None
        if self.args.multires_noise > 0:   # drawn from g too: a resumed run repeats it
            noise = multires_noise(dep.shape, self.args.multires_noise, g).to(dep.device, dep.dtype)
        return dict(x1=dep, concat=img, mask=mask, noise=noise, context=self.context.expand(len(img), -1, -1))

    def baseline(self):
        import sample
        return dict(kind="trivial", **sample.evaluate_trivial(self.train_set, self.heldout, self.args.norm))

    def report(self, unet, step):
        """The final table: sample.py's protocol (aligned ensemble) on more held-out scenes than validation
        uses, since 64 scenes and one member cannot resolve a few percent. At step 0 with the trivial baseline."""
        import sample
        if self.report_set is None:
            return []
        recs = []
        if step == 0:
            trivial = sample.evaluate_trivial(self.train_set, self.report_set, self.args.norm)
            recs.append(dict(kind="report_trivial", **trivial))
        recs.append(dict(kind="report", **sample.evaluate_heldout(
            unet, self.vae, self.d2f, self.context, self.report_set, self.args.objective, REPORT_STEPS, norm=self.args.norm,
            ensemble=REPORT_ENSEMBLE, multires=self.args.multires_noise)))
        return recs

    def validate(self, unet, step):
        import sample
        return sample.evaluate_heldout(unet, self.vae, self.d2f, self.context, self.heldout, self.args.objective,
                                       self.args.val_steps, norm=self.args.norm, multires=self.args.multires_noise,
                                       preview=os.path.join(self.args.out, f"preview_{step:06d}.png"))

    @staticmethod
    def describe(r):
        return f"held-out AbsRel {r['abs_rel']:.4f} δ1 {r['delta1']:.4f}"

    def summary(self, records, log):
        space = "log" if self.args.norm == "log" else "depth"
        vals = [r for r in records if r["kind"] == "val"]
        trivial = [r for r in records if r["kind"] == "trivial"][-1]
        reports = [r for r in records if r["kind"] == "report"]
        table = (vals[0], trivial, vals[-1])
        how = f"{len(self.heldout)} scenes, {self.args.val_steps} steps, 1 member"
        if len(reports) >= 2 and reports[0]["step"] == 0:
            log(f"\nvalidation ({how}): untouched prior {vals[0]['abs_rel']:.4f}, mean depth map "
                f"{trivial['abs_rel']:.4f}, finetuned {vals[-1]['abs_rel']:.4f} AbsRel")
            table = (reports[0], [r for r in records if r["kind"] == "report_trivial"][-1], reports[-1])
            how = (f"{self.args.report_scenes} scenes, {REPORT_STEPS} steps, ensemble {REPORT_ENSEMBLE}, "
                   f"as python sample.py --steps {REPORT_STEPS}")
        log(f"\nheld-out depth ({how}; alignment in {space} space):")
        log(f"  {'':34s} AbsRel ↓  δ1 ↑")
        for name, r in zip(("untouched prior", "trivial baseline (mean depth map)",
                            f"finetuned ({self.args.objective}, step {table[2]['step']})"), table):
            log(f"  {name:34s} {r['abs_rel']:.4f}   {r['delta1']:.4f}")


class ImageTask:
    """Text-to-image (image-caption folders) and reflow (stored noise/latent/caption pairs)."""
    MANY_STEPS = 25      # the reference trajectory of the straightness measure at validation

    def __init__(self, args, vae, text_encoder, context, d2f, info, device, log):
        self.args, self.vae, self.text, self.context, self.d2f, self.device = args, vae, text_encoder, context, d2f, device
        if args.task == "t2i":
            hw = info["res"] = parse_res(args.res, info["tiny"], square=True)
            dataset = data_t2i.CaptionFolder(args.data, hw, args.manifest, args.caption_dropout, args.seed)
            rgb = [dataset.image(i) for i in tqdm(range(len(dataset)), desc="encoding images", leave=False)]
            with torch.no_grad():   # the VAE is frozen and the crop fixed: encode each image once
                self.latents = torch.cat([vae.encode(torch.stack(rgb[i:i + 16]).to(device)).cpu() for i in range(0, len(rgb), 16)])
            self.noise, self.captions = None, [c for _, c in dataset.items]
        else:
            pairs = data_t2i.ReflowPairs(args.pairs)
            self.latents, self.noise, self.captions = pairs.latent, pairs.noise, pairs.captions
            info["res"] = tuple(s * 2 ** (len(vae.cfg.ch_mult) - 1) for s in self.latents.shape[-2:])
        if text_encoder is None and any(self.captions):
            log("note: this checkpoint has no text encoder (the tiny prior): captions are ignored, training is unconditional")
        log(f"{args.task}: {len(self.latents)} {'images' if args.task == 't2i' else 'pairs'}, latents {tuple(self.latents.shape[1:])}")
        g = torch.Generator().manual_seed(10 ** 6)   # held-out noise, never used in training
        self.val_noise = torch.randn((8, *self.latents.shape[1:]), generator=g).to(device)
        prompts = data_t2i.read_prompts(args.val_prompts) if args.val_prompts else (self.captions[:8] or [""])
        self.val_context = self.encode_text([prompts[i % len(prompts)] for i in range(8)])

    def encode_text(self, captions):
        if self.text is None:
            return self.context.expand(len(captions), -1, -1)
        with torch.no_grad():
            return self.text.encode(captions).to(self.device)

    def batch(self, g):
        idx = torch.randint(len(self.latents), (self.args.batch_size,), generator=g)
        drop = torch.rand(len(idx), generator=g) < self.args.caption_dropout   # for classifier-free guidance
        captions = ["" if d else self.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        noise = None if self.noise is None else self.noise[idx].to(self.device)
        return dict(x1=self.latents[idx].to(self.device), concat=None, mask=None, noise=noise, context=self.encode_text(captions))

    def baseline(self):
        return None

    def report(self, unet, step):
        return []

    def validate(self, unet, step):
        import sample
        return sample.straightness(unet, self.vae, self.d2f, self.val_context, self.val_noise, self.args.objective,
                                   few=self.args.val_steps, many=self.MANY_STEPS,
                                   preview=os.path.join(self.args.out, f"preview_{step:06d}.png"))

    def describe(self, r):
        return (f"{self.args.val_steps}-step vs {self.MANY_STEPS}-step distance {r['distance']:.4f}, spread "
                f"{r['spread']:.3f} ({self.MANY_STEPS}-step: {r['spread_many']:.3f})")

    def summary(self, records, log):
        vals = [r for r in records if r["kind"] == "val"]
        log(f"\nheld-out noise, {self.args.val_steps} Euler steps against {self.MANY_STEPS} from the same noise:")
        for name, r in (("before", vals[0]), (f"after {vals[-1]['step']} steps", vals[-1])):
            log(f"  {name:20s} {self.describe(r)}")


# ---------------------------------------------------------------------------------------------------
# Bits of the loop

def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.decay == "none":
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed, step, rank):
    """Every random draw of a step comes from this seed: a resumed run repeats the same batches and noise."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2 ** 63)


def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trained_params(unet):
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def save_run(out, unet, opt, ema, step, args, info):
    """LoRA (kohya format) or full UNet weights + the training state, each written atomically."""
    meta = dict(lora_metadata(info["family"] if info["family"] in ("sd1", "sd2") else "sd2", info["prediction"],
                              task=args.task, objective=args.objective, zero_snr=info["zero_snr"]),
                **{"diff2flow.base_checkpoint": os.path.basename(info["ckpt"]), "diff2flow.norm": args.norm,
                   "diff2flow.multires_noise": str(args.multires_noise),
                   "diff2flow.t_density": args.t_density,
                   "diff2flow.family": info["family"], "diff2flow.step": str(step),
                   "diff2flow.res_long_edge": str(max(info["res"]))})
    with ema_weights(unet, ema):                        # the saved LoRA holds the EMA weights
        save_lora(os.path.join(out, LORA_FILE), unet, meta)
    live = {n: p.detach().cpu() for n, p in trained_params(unet).items()}
    state = dict(step=step, opt=opt.state_dict(), live=live,
                 ema=None if ema is None else {n: t.cpu() for n, t in ema.items()}, args=vars(args), info=info)
    atomic_torch_save(state, os.path.join(out, STATE_FILE))


def setup_ddp(device):
    """torchrun sets RANK/WORLD_SIZE: start the process group (nccl on GPU, gloo on CPU)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_ddp(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)

    unet, vae, text_encoder, context, d2f, info = build(args, log)
    tiny = info["tiny"]
    args.steps = args.steps or (1500 if tiny else 20000)
    args.batch_size = args.batch_size or (8 if tiny else 2)
    args.lr = args.lr or (3e-5 if args.lora_rank == 0 else (1e-3 if tiny else 1e-4))
    args.val_every = args.val_every or max(1, args.steps // 4)
    if args.multires_noise is None:
        args.multires_noise = 0.9 if tiny and args.task == "depth" else 0.0
        if args.multires_noise:
            log(f"source: multi-resolution noise {args.multires_noise} (the tiny demo's default: from white noise "
                f"this prior learns no held-out depth, see README; --multires-noise 0 for the method as written)")
    if args.t_density is None:
        args.t_density = "logit-normal:-3" if tiny and args.task == "depth" and args.objective == "diff2flow" else "uniform"
        if args.t_density != "uniform":
            log(f"training times: t ~ {args.t_density} (the tiny demo's default: most of training near t = 0, "
                f"where few-step samples read the image; see README; --t-density uniform for the method as written)")
    logit_normal = t_density(args.t_density)
    for m in (unet, vae, text_encoder):
        if m is not None:
            m.to(device)
    context = context.to(device)
    os.makedirs(args.out, exist_ok=True)
    if args.task == "depth":
        task = DepthTask(args, vae, context, d2f, info, device, log)
    else:
        task = ImageTask(args, vae, text_encoder, context, d2f, info, device, log)

    params = list(trained_params(unet).values())
    # fused AdamW: one kernel over all tensors (measured 3.9x faster than foreach on the CPU too)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), fused=True)
    ema = {n: p.detach().clone() for n, p in trained_params(unet).items()} if args.ema > 0 else None
    start = 0
    state_path = os.path.join(args.out, STATE_FILE)
    if args.resume:
        if not os.path.exists(state_path):
            raise SystemExit(f"--resume: no {STATE_FILE} in {args.out}; start without --resume")
        state = torch.load(state_path, map_location=device, weights_only=True)
        copy_params(unet, state["live"])
        opt.load_state_dict(state["opt"])
        if ema is not None and state["ema"] is not None:
            ema = {n: t.to(device) for n, t in state["ema"].items()}
        start = state["step"]
        log(f"resumed {args.out} at step {start}")

    net = torch.compile(unet) if args.compile else unet
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(net, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.startswith("cuda"))
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    def evaluated(fn, step):
        """Validation and the report run on the EMA weights when there are any."""
        unet.eval()
        with ema_weights(unet, ema):
            scores = fn(unet, step)
        unet.train()
        return scores

    def validate(step):
        return evaluated(task.validate, step)

    logf = open(os.path.join(args.out, LOG_FILE), "a") if master else None

    def write_log(rec):
        if logf:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()

    if master and start == 0:
        base = task.baseline()
        if base is not None:
            write_log(dict(step=0, **base))
        before = validate(0)
        log(f"before training: {task.describe(before)}")
        write_log(dict(step=0, kind="val", **before))
        for rec in evaluated(task.report, 0):
            write_log(dict(step=0, **rec))

    unet.train()
    t0, losses = time.time(), []
    end = min(args.steps, args.stop_at or args.steps)
    bar = tqdm(range(start, end), initial=start, total=args.steps, disable=not master, desc="train")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        for micro in range(args.grad_accum):
            seed = step_seed(args.seed, step * args.grad_accum + micro, rank)
            batch = task.batch(torch.Generator().manual_seed(seed))
            torch.manual_seed(seed)                      # t and noise: a resumed run draws the same
            sync = world > 1 and micro < args.grad_accum - 1
            with (net.no_sync() if sync else nullcontext()), autocast():
                model = conditioned(net, batch["context"], concat=batch["concat"])
                t = None if logit_normal is None else d2f.sample_t(len(batch["x1"]), batch["x1"].device, logit_normal)
                loss = d2f.loss(model, batch["x1"], args.objective, noise=batch["noise"], mask=batch["mask"], t=t,
                                changes=args.diffusion_changes).mean() / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for n, p in trained_params(unet).items():
                    ema[n].lerp_(p.detach(), 1 - args.ema)
        losses.append(loss.item() * args.grad_accum)
        done = step + 1
        if master and (done % 10 == 0 or done == end):
            rec = dict(step=done, kind="train", loss=float(np.mean(losses)), lr=lr_at(step, args), sec=time.time() - t0)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            write_log(rec)
            losses = []
        if master and (done % args.val_every == 0 or done == args.steps):
            scores = validate(done)
            bar.write(f"step {done}: {task.describe(scores)}")
            write_log(dict(step=done, kind="val", **scores))
        if master and (done % args.save_every == 0 or done == end):
            save_run(args.out, unet, opt, ema, done, args, info)

    if world > 1:
        check_ranks_agree(unet, log, write_log)
    if master and end == args.steps:
        for rec in evaluated(task.report, end):
            write_log(dict(step=end, **rec))
    if master:
        with open(os.path.join(args.out, LOG_FILE)) as f:
            task.summary([json.loads(line) for line in f], log)
        log(f"wrote {os.path.join(args.out, LORA_FILE)} and previews; next: python sample.py"
            + (" --steps 2" if args.task == "depth" else f" --task t2i --run {args.out} --steps 2"))
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


@contextmanager
def ema_weights(unet, ema):
    """Run a block with the EMA weights in place of the live ones (nothing to do without EMA)."""
    if ema is None:
        yield
        return
    live = {n: p.detach().clone() for n, p in trained_params(unet).items()}
    copy_params(unet, ema)
    try:
        yield
    finally:
        copy_params(unet, live)


def copy_params(unet, tensors):
    with torch.no_grad():
        for n, p in trained_params(unet).items():
            p.copy_(tensors[n])


def check_ranks_agree(unet, log, write_log):
    """DDP keeps replicas identical; check it (cheap, and it catches a rank that drifted)."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().float().flatten().cpu() for p in trained_params(unet).values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    log(f"DDP: trained parameters on {len(gathered)} ranks agree to max |Δ| = {diff:.3g}")
    write_log(dict(kind="ddp", max_diff=diff, ranks=len(gathered)))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:   # bad input: one clear line, not a traceback
        sys.exit(f"error: {e}")
