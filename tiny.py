"""
tiny.py: train the bundled tiny prior, a Stable-Diffusion-shaped model small enough for a laptop CPU.

What a machine without a 5 GB SD checkpoint uses instead (train.py finds it in assets/). It has SD's
exact layout and conventions, only narrower, so everything downstream runs the same code path:
  - a KL autoencoder (vae.AutoencoderKL, LDM names), 4x downsampling to 4 latent channels, trained on
    rendered RGB scenes AND their log-normalised depth maps (repeated to 3 channels), because the
    depth task decodes depth through this VAE, as Marigold does with SD's;
  - its latents brought to unit variance for SD's own constant 0.18215 (folded into quant_conv, so
    vae.py's encode/decode stay SD's);
  - an SD2-like UNet (linear proj_in, channels per head), v-prediction on SD's schedule without the
    zero-SNR rescale (SD 2.1's own training), unconditional: the cross-attention always sees one fixed
    "empty prompt" embedding, stored in the file in place of a text encoder;
  - its samples scored by a Fréchet distance to held-out scenes in fd.py's feature space;
  - written as one single-file checkpoint (model.diffusion_model.*, first_stage_model.*,
    empty_context) by checkpoint.save_sd_checkpoint, then loaded back and checked.

    python tiny.py --threads 1                            # the bundled file: ~2 hours on one core (VAE 40-55 min, UNet 60 min)
    python tiny.py --threads 1 --vae-from OLD.safetensors # keep another prior's autoencoder, train a new UNet
    python tiny.py --scenes 64 --vae-steps 10 --unet-steps 10 --fd-samples 32 --out runs/smoke/tiny.safetensors --work runs/smoke

Every stage keeps its result in --work (renders, VAE, latents, UNet with EMA and optimizer state), so a
run that is stopped goes on where it was when started again with the same arguments.
"""
import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from checkpoint import load_sd_checkpoint, save_sd_checkpoint
from data import RenderedDepthDataset, normalize_depth, denormalize_depth
from depth_eval import depth_metrics, evaluate_depth
from diff2flow import Diff2Flow, conditioned
from unet import UNetConfig, UNetModel
from vae import SCALE_FACTOR, AutoencoderKL, VAEConfig

# the two architectures: SD's layouts at a fraction of the width (see the module docstring)
VAE_CFG = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4)  # 96x128 -> 24x32
UNET_CFG = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                      attention_levels=(1, 2), transformer_depth=1, context_dim=64, num_heads=-1,
                      num_head_channels=32, use_linear_in_transformer=True)
CONTEXT_LEN = 77  # SD's token count; the empty-prompt embedding is (1, 77, context_dim)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/tiny_prior.safetensors", help="the checkpoint to write")
    p.add_argument("--work", default="runs/tiny", help="folder for renders and resumable stage checkpoints")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--scenes", default=20000, type=int, help="training scenes (train split seeds 0..n-1)")
    p.add_argument("--eval-scenes", default=64, type=int, help="held-out scenes for the reconstruction numbers")
    p.add_argument("--res", default="48x64", help="HxW of the rendered scenes")
    p.add_argument("--vae-from", default=None, help="take the (latent-scaled) autoencoder of this single-file "
                   "checkpoint instead of training one; the VAE stage is then skipped")
    p.add_argument("--vae-steps", default=2000, type=int)
    p.add_argument("--vae-batch", default=32, type=int, help="RGB and depth crops")
    p.add_argument("--vae-rgb", default=0.75, type=float, help="share of RGB crops in a VAE batch (the rest depth; "
                   "at 0.5 the first prior's VAE had dropped colour from its latents)")
    p.add_argument("--vae-crop", default=48, type=int, help="square training crops (the VAE is convolutional)")
    p.add_argument("--vae-lr", default=1e-3, type=float)
    p.add_argument("--kl-weight", default=1e-6, type=float, help="LDM's KL weight, relative to a per-pixel summed L1")
    p.add_argument("--unet-ch", default=UNET_CFG.model_channels, type=int, help="the UNet's base width (the bundled "
                   "file's is 32; 64 has four times the compute per step)")
    p.add_argument("--unet-steps", default=10000, type=int)
    p.add_argument("--unet-stop", default=None, type=int, help="end the UNet stage after this step (the LR "
                   "schedule still spans --unet-steps) and write the checkpoint from its EMA weights")
    p.add_argument("--unet-batch", default=32, type=int)
    p.add_argument("--unet-lr", default=5e-4, type=float)
    p.add_argument("--ema", default=0.999, type=float, help="EMA decay of the UNet weights (0: no EMA)")
    p.add_argument("--fd-samples", default=512, type=int, help="samples scored by fd.py (against twice as many held-out scenes)")
    p.add_argument("--warmup", default=200, type=int, help="linear LR warm-up steps of both stages")
    p.add_argument("--save-every", default=250, type=int, help="steps between stage checkpoints")
    p.add_argument("--threads", default=2, type=int)
    args = p.parse_args(argv)
    if args.unet_ch <= 0 or args.unet_ch % 32:
        p.error(f"--unet-ch {args.unet_ch}: the UNet's GroupNorm needs a positive multiple of 32 channels (32, 64, 96, ...)")
    return args


# ----------------------------------------------------------------------------- small helpers

def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cosine_lr(step, total, peak, warmup):
    """Linear warm-up to `peak`, then a cosine down to 5% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def load_stage(path, key):
    """A stage checkpoint from --work, or None. `key` are the settings it was made with: refusing a
    mismatch keeps a rerun with other flags from silently continuing someone else's run."""
    if not os.path.exists(path):
        return None
    ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers, strings, lists and dicts only
    if ck["key"] != key:
        raise ValueError(f"{path} was made with other settings ({ck['key']} != {key}): delete it or pass another --work")
    return ck


# ----------------------------------------------------------------------------- 1. scenes

def render_split(split, n, hw, work):
    """Render n scenes once into tensors: rgb (N, 3, H, W) uint8, depth/valid (N, 1, H, W), and the
    log-normalised depth (N, 1, H, W) in [-1, 1] (invalid pixels = +1, data.normalize_depth's policy)."""
    path = os.path.join(work, f"scenes_{split}_{n}_{hw[0]}x{hw[1]}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    t0 = time.time()
    ds = RenderedDepthDataset.split(split, n, *hw, cache=False)
    rgb, depth, valid = [], [], []
    for i in tqdm(range(n), desc=f"render {split}", mininterval=10):
        item = ds[i]
        rgb.append(((item["rgb"] + 1) * 127.5).round().to(torch.uint8))  # exact: items are 8-bit images
        depth.append(item["depth"])
        valid.append(item["valid"])
    s = dict(rgb=torch.stack(rgb), depth=torch.stack(depth), valid=torch.stack(valid))
    s["dnorm"] = normalize_depth(s["depth"], s["valid"], "log")[0]
    s["seconds"] = time.time() - t0
    atomic_torch_save(s, path)
    print(f"rendered {n} {split} scenes in {s['seconds']:.0f} s")
    return s


def to_float(rgb8):
    return rgb8.float() / 127.5 - 1  # uint8 -> [-1, 1]


# ----------------------------------------------------------------------------- 2. the autoencoder

def vae_batch(scenes, batch, crop, rgb_share=0.5):
    """RGB and depth (normalised, repeated to 3 channels), rgb_share of the batch RGB: random crops,
    random left-right flips."""
    N, _, H, W = scenes["rgb"].shape
    idx = torch.randint(0, N, (batch,))
    ys, xs = torch.randint(0, H - crop + 1, (batch,)), torch.randint(0, W - crop + 1, (batch,))
    out = []
    for k, (i, y, x) in enumerate(zip(idx.tolist(), ys.tolist(), xs.tolist())):
        if k < round(batch * rgb_share):
            img = to_float(scenes["rgb"][i, :, y:y + crop, x:x + crop])
        else:
            img = scenes["dnorm"][i, :, y:y + crop, x:x + crop].float().expand(3, -1, -1)
        out.append(img.flip(-1) if torch.rand(()) < 0.5 else img)
    return torch.stack(out)  # (B, 3, crop, crop)


def vae_loss(vae, x, kl_weight):
    """L1 reconstruction from a posterior sample + kl_weight * KL(q(z|x) || N(0, I)), both per pixel
    (LDM's loss divided by the pixel count, without its perceptual and GAN terms)."""
    mean, logvar = vae.moments(x)  # (B, 4, h, w) each, unscaled
    z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
    rec = (vae.decoder(vae.post_quant_conv(z)) - x).abs().mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum() / x.numel()
    return rec + kl_weight * kl, rec, kl


def train_vae(args, scenes, work):
    path = os.path.join(work, "vae.pt")
    key = dict(cfg=asdict(VAE_CFG), steps=args.vae_steps, batch=args.vae_batch, crop=args.vae_crop, lr=args.vae_lr,
               kl=args.kl_weight, seed=args.seed, scenes=args.scenes, rgb=args.vae_rgb)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(VAE_CFG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ck = load_stage(path, key)
    step, elapsed, log = 0, 0.0, []
    if ck is not None:
        vae.load_state_dict(ck["model"]), opt.load_state_dict(ck["opt"]), torch.set_rng_state(ck["rng"])
        step, elapsed, log = ck["step"], ck["elapsed"], ck["log"]
        print(f"vae: resuming at step {step}/{args.vae_steps}")
    vae.train()
    t0, ema_loss = time.time() - elapsed, None
    bar = tqdm(range(step, args.vae_steps), desc="vae", mininterval=10, initial=step, total=args.vae_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, args.warmup)
        loss, rec, kl = vae_loss(vae, vae_batch(scenes, args.vae_batch, args.vae_crop, args.vae_rgb), args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema_loss = rec.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * rec.item()
        bar.set_postfix(l1=f"{ema_loss:.4f}", kl=f"{kl.item():.1f}", refresh=False)
        done = step + 1 == args.vae_steps
        if (step + 1) % args.save_every == 0 or done:
            log.append(dict(step=step + 1, l1=ema_loss, kl=kl.item(), seconds=time.time() - t0))
            tqdm.write(f"vae step {step + 1}: L1 {ema_loss:.4f} KL {kl.item():.1f} ({time.time() - t0:.0f} s)")
            atomic_torch_save(dict(key=key, model=vae.state_dict(), opt=opt.state_dict(), rng=torch.get_rng_state(),
                                   step=step + 1, elapsed=time.time() - t0, log=log), path)
    if ck is not None and ck["step"] >= args.vae_steps:
        elapsed = ck["elapsed"]
    else:
        elapsed = time.time() - t0
    return vae.eval(), elapsed, log


@torch.no_grad()
def latent_std(vae, rgb8, batch=64):
    """Std of the posterior means (unscaled) over a set of images: SD's 0.18215 is 1 / this std for its VAE."""
    means = torch.cat([vae.moments(to_float(rgb8[i:i + batch]))[0] for i in range(0, len(rgb8), batch)])
    return means.std().item()


@torch.no_grad()
def fold_latent_scale(vae, s):
    """Make encode() give unit-std latents with SD's constant, without touching vae.py: with
    c = 1 / (s * SCALE_FACTOR), scale quant_conv's mean half by c (its variance by c^2, i.e. add
    2 log c to the logvar bias) and post_quant_conv's input by 1/c. Then encode = mean * c * 0.18215
    = mean / s, and decode(encode(x)) is the same function as before."""
    c = 1.0 / (s * SCALE_FACTOR)
    e = vae.cfg.embed_dim
    vae.quant_conv.weight[:e] *= c  # (2e, 2z, 1, 1): output channels [mean | logvar]
    vae.quant_conv.bias[:e] *= c
    vae.quant_conv.bias[e:] += 2 * math.log(c)
    vae.post_quant_conv.weight *= 1.0 / c  # (z, e, 1, 1): a 1x1 conv is linear in its input
    return c


def chroma(x):
    """Mean per-pixel colour range (max - min over RGB, in [0, 1] units) of (B, 3, H, W) images in [-1, 1]:
    PSNR hides an autoencoder that greys the scenes out; the ratio of this before and after does not."""
    return (x.amax(1) - x.amin(1)).mean().item() / 2


@torch.no_grad()
def evaluate_vae(vae, held):
    """Reconstruction error on held-out scenes: RGB and normalised depth in [-1, 1] units, and depth
    AbsRel/delta1 of the reconstruction (a) de-normalised with the image's own quantiles and (b) aligned
    in log space as depth_eval.evaluate_depth does for models. `floor` = the same numbers for the
    un-reconstructed normalised depth (the quantile clipping alone). rgb_chroma_kept: the share of the
    scenes' colour range (chroma) the reconstruction keeps, 1 = all."""
    rgb = to_float(held["rgb"])
    rec_rgb = vae.decode(vae.encode(rgb))
    dn = held["dnorm"].float()
    rec_dn = vae.decode(vae.encode(dn.expand(-1, 3, -1, -1))).mean(1, keepdim=True)  # average the 3 channels back
    v = held["valid"]
    r = dict(rgb_mse=F.mse_loss(rec_rgb, rgb).item(), rgb_mae=(rec_rgb - rgb).abs().mean().item(),
             rgb_psnr=(10 * torch.log10(4 / ((rec_rgb.clamp(-1, 1) - rgb) ** 2).mean((1, 2, 3)))).mean().item(),
             rgb_chroma_kept=chroma(rec_rgb.clamp(-1, 1)) / chroma(rgb),
             depth_mse=((rec_dn - dn) ** 2)[v].mean().item(), depth_mae=(rec_dn - dn).abs()[v].mean().item())
    _, lo, hi = normalize_depth(held["depth"], v, "log")
    acc = {k: [] for k in ("denorm", "aligned", "floor_denorm", "floor_aligned")}
    for i in range(len(dn)):
        g, vi = held["depth"][i, 0], v[i, 0]
        for name, x in (("", rec_dn[i, 0].clamp(-1, 1)), ("floor_", dn[i, 0])):
            acc[name + "denorm"].append(depth_metrics(denormalize_depth(x, lo[i], hi[i], "log"), g, vi))
            acc[name + "aligned"].append(evaluate_depth(x, g, vi, "rendered", "log"))
    for name, ms in acc.items():
        r[f"depth_absrel_{name}"] = float(np.mean([m["abs_rel"] for m in ms]))
        r[f"depth_delta1_{name}"] = float(np.mean([m["delta1"] for m in ms]))
    return r, rec_rgb, rec_dn


# ----------------------------------------------------------------------------- 3. latents

@torch.no_grad()
def encode_latents(vae, rgb8, work, key, batch=64):
    """Scaled latents of every training scene and of its mirror image (2N, 4, h, w): a flip is a free
    second scene, and encoding it (rather than flipping the latent) keeps it exact."""
    path = os.path.join(work, "latents.pt")
    ck = load_stage(path, key)
    if ck is not None:
        return ck["latents"], ck["seconds"]
    t0, out = time.time(), []
    for i in tqdm(range(0, len(rgb8), batch), desc="encode", mininterval=10):
        x = to_float(rgb8[i:i + batch])
        out += [vae.encode(x), vae.encode(x.flip(-1))]
    lat = torch.cat(out)
    atomic_torch_save(dict(key=key, latents=lat, seconds=time.time() - t0), path)
    return lat, time.time() - t0


# ----------------------------------------------------------------------------- 4. the UNet

def train_unet(args, latents, context, work):
    path = os.path.join(work, "unet.pt")
    cfg = replace(UNET_CFG, model_channels=args.unet_ch)
    key = dict(cfg=asdict(cfg), steps=args.unet_steps, batch=args.unet_batch, lr=args.unet_lr, ema=args.ema,
               seed=args.seed, n=len(latents))
    torch.manual_seed(args.seed + 1)
    unet = UNetModel(cfg)
    ema = UNetModel(cfg).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    ck = load_stage(path, key)
    step, elapsed, log = 0, 0.0, []
    if ck is not None:
        unet.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"])
        step, elapsed, log = ck["step"], ck["elapsed"], ck["log"]
        print(f"unet: resuming at step {step}/{args.unet_steps}")
    d2f = Diff2Flow(prediction="v", zero_snr=False)  # SD 2.1's own setting
    model = conditioned(unet, context.expand(args.unet_batch, -1, -1))
    unet.train()
    t0, ema_loss = time.time() - elapsed, None
    stop = min(args.unet_steps, args.unet_stop or args.unet_steps)
    bar = tqdm(range(step, stop), desc="unet", mininterval=10, initial=step, total=args.unet_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.unet_steps, args.unet_lr, args.warmup)
        x1 = latents[torch.randint(0, len(latents), (args.unet_batch,))]  # (B, 4, 24, 32)
        loss = d2f.loss(model, x1, "diffusion").mean()  # v-MSE at tau ~ U{0..999} on SD's schedule
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # EMA with a short warm-up, so early weights do not linger
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}", refresh=False)
        done = step + 1 == stop
        if (step + 1) % args.save_every == 0 or done:
            log.append(dict(step=step + 1, loss=ema_loss, seconds=time.time() - t0))
            tqdm.write(f"unet step {step + 1}: loss {ema_loss:.4f} ({time.time() - t0:.0f} s)")
            atomic_torch_save(dict(key=key, model=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                   rng=torch.get_rng_state(), step=step + 1, elapsed=time.time() - t0, log=log), path)
    elapsed = ck["elapsed"] if ck is not None and ck["step"] >= stop else time.time() - t0
    return (ema if args.ema > 0 else unet).eval(), elapsed, log


# ----------------------------------------------------------------------------- 5. how good are its samples

@torch.no_grad()
def sample_quality(unet, vae, context, held_rgb8, n=512, steps=50, seed=12345):
    """Fréchet distances in fd.py's feature space to held_rgb8 (held-out scenes, N > n): of n samples
    (DDIM on the prior's own schedule, `steps` steps), and two references on the same n: other real
    held-out scenes (the floor of n samples) and their VAE reconstructions (what the autoencoder alone costs)."""
    import fd
    import sample
    net = fd.load_features()
    ref, other = to_float(held_rgb8[n:]), to_float(held_rgb8[:n])
    target = fd.image_features(net, ref)
    noise = torch.randn(n, 4, ref.shape[-2] // 4, ref.shape[-1] // 4, generator=torch.Generator().manual_seed(seed))
    lat = sample.generate(unet, Diff2Flow("v", zero_snr=False), context.expand(n, -1, -1), noise, steps, "diffusion", batch=128)
    samples = sample.decode(vae, lat, batch=128)
    recon = sample.decode(vae, torch.cat([vae.encode(x) for x in other.split(128)]), batch=128)
    return dict(fd_samples=fd.fd_between(fd.image_features(net, samples), target),
                fd_real=fd.fd_between(fd.image_features(net, other), target),
                fd_vae=fd.fd_between(fd.image_features(net, recon), target), n=n, steps=steps), samples


# ----------------------------------------------------------------------------- 6. pictures

def to_uint8(x):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def depth_to_uint8(d):
    """(B, 1, H, W) normalised depth in [-1, 1] -> grey (B, H, W, 3) uint8, near = bright."""
    return to_uint8((-d).expand(-1, 3, -1, -1))


def save_grid(path, rows, pad=2):
    """rows: list of (B, H, W, 3) uint8 arrays -> one PNG, one row each."""
    B, H, W, _ = rows[0].shape
    grid = np.full((len(rows) * (H + pad) + pad, B * (W + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for b in range(B):
            grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + b * (W + pad):pad + b * (W + pad) + W] = row[b]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hw = tuple(int(v) for v in args.res.lower().split("x"))
    os.makedirs(args.work, exist_ok=True)

    # 1. scenes
    train = render_split("train", args.scenes, hw, args.work)
    held = render_split("heldout", args.eval_scenes, hw, args.work)

    # 2. autoencoder, then its latent scale folded in
    if args.vae_from:  # an autoencoder that is already latent-scaled: nothing to train or fold
        vae, vae_seconds, vae_log = load_sd_checkpoint(args.vae_from).vae, 0.0, [dict(l1=float("nan"))]
        s, c, fold_err = latent_std(vae, train["rgb"][:1000]), 1.0, 0.0     # folded already: c = 1
    else:
        vae, vae_seconds, vae_log = train_vae(args, train, args.work)
        s = latent_std(vae, train["rgb"][:1000])
        x = to_float(held["rgb"][:16])
        with torch.no_grad():
            before = vae.decode(vae.encode(x))
            c = fold_latent_scale(vae, s)
            after = vae.decode(vae.encode(x))
        fold_err = (after - before).abs().max().item()
    print(f"vae: {n_params(vae):,} parameters, {vae_seconds / 60:.1f} min")
    s_after = latent_std(vae, held["rgb"]) * SCALE_FACTOR  # encode() = mean * 0.18215, on held-out scenes
    print(f"latent std before folding {s:.4f} -> c = {c:.4f}; encode() std now {s_after:.4f} (held-out scenes); "
          f"decode(encode(x)) changed by at most {fold_err:.2e}")
    vae_eval, rec_rgb, rec_dn = evaluate_vae(vae, held)
    print("vae on held-out scenes: " + ", ".join(f"{k} {v:.4f}" for k, v in vae_eval.items()))
    save_grid(os.path.join(os.path.dirname(args.out), "tiny_vae_recon.png"),
              [to_uint8(to_float(held["rgb"][:8])), to_uint8(rec_rgb[:8]),
               depth_to_uint8(held["dnorm"][:8].float()), depth_to_uint8(rec_dn[:8])])

    # 3. latents of the training scenes (and their mirror images)
    lat, enc_seconds = encode_latents(vae, train["rgb"], args.work, dict(scenes=args.scenes, s=s))  # s identifies the VAE
    print(f"latents {tuple(lat.shape)}: mean {lat.mean():.3f}, std {lat.std():.3f}, "
          f"per channel std {[round(v, 3) for v in lat.std((0, 2, 3)).tolist()]}")

    # 4. UNet on a fixed "empty prompt" embedding: seeded N(0, 1) so cross-attention has something to attend to
    context = torch.randn(1, CONTEXT_LEN, UNET_CFG.context_dim, generator=torch.Generator().manual_seed(args.seed))
    unet, unet_seconds, unet_log = train_unet(args, lat, context, args.work)
    print(f"unet: {n_params(unet):,} parameters, {unet_seconds / 60:.1f} min")

    # 5. how good its samples are: FD in fd.py's feature space (2 x --fd-samples held-out scenes as the reference)
    fd_held = render_split("heldout", 3 * args.fd_samples, hw, args.work)["rgb"]
    quality, _ = sample_quality(unet, vae, context, fd_held, n=args.fd_samples)
    print("FD to held-out scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items() if k.startswith("fd")))

    # 6. the single-file checkpoint
    wall = train["seconds"] + held["seconds"] + vae_seconds + enc_seconds + unet_seconds  # summed over resumed runs too
    command = "python " + shlex.join(["tiny.py"] + (sys.argv[1:] if argv is None else list(argv)))
    meta = {"diff2flow.prediction_type": "v", "diff2flow.zero_snr": "false", "diff2flow.objective": "diffusion",
            "diff2flow.family": "tiny", "diff2flow.res": f"{hw[0]}x{hw[1]}",
            "diff2flow.tiny.command": command,
            "diff2flow.tiny.seed": str(args.seed),
            "diff2flow.tiny.wall_minutes": f"{wall / 60:.1f}",
            "diff2flow.tiny.stage_minutes": json.dumps({k: round(v / 60, 2) for k, v in dict(
                render=train["seconds"] + held["seconds"], vae=vae_seconds, encode=enc_seconds, unet=unet_seconds).items()}),
            "diff2flow.tiny.threads": str(args.threads), "diff2flow.tiny.torch": torch.__version__,
            "diff2flow.tiny.vae_config": json.dumps(asdict(VAE_CFG)), "diff2flow.tiny.unet_config": json.dumps(asdict(unet.cfg)),
            "diff2flow.tiny.latent_std_unscaled": f"{s:.6f}", "diff2flow.tiny.latent_fold_c": f"{c:.6f}",
            "diff2flow.tiny.vae_from": args.vae_from or "",
            "diff2flow.tiny.vae_final_l1": f"{vae_log[-1]['l1']:.5f}", "diff2flow.tiny.unet_final_loss": f"{unet_log[-1]['loss']:.5f}",
            "diff2flow.tiny.vae_heldout": json.dumps({k: round(v, 5) for k, v in vae_eval.items()}),
            "diff2flow.tiny.sample_fd": json.dumps({k: round(v, 4) for k, v in quality.items()}),
            "diff2flow.tiny.data": f"{args.scenes} rendered train scenes (data.RenderedDepthDataset seeds 0..{args.scenes - 1}) and mirror images",
            "diff2flow.tiny.empty_context": f"torch.randn(1, {CONTEXT_LEN}, {UNET_CFG.context_dim}) from torch.Generator().manual_seed({args.seed})"}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    save_sd_checkpoint(args.out, unet, vae, empty_context=context, metadata=meta)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2 ** 20:.1f} MiB, {wall / 60:.1f} min of training")

    # 7. load it back through the one loader: same tensors, same samples
    ck = load_sd_checkpoint(args.out)
    mism = [k for k, v in unet.state_dict().items() if not torch.equal(v, ck.unet.state_dict()[k])]
    mism += [k for k, v in vae.state_dict().items() if not torch.equal(v, ck.vae.state_dict()[k])]
    if mism or not torch.equal(ck.empty_context(), context) or ck.prediction != "v":
        raise RuntimeError(f"round trip through load_sd_checkpoint failed: {mism[:5]}, prediction {ck.prediction}")
    n = 8
    noise = torch.randn(n, 4, hw[0] // 4, hw[1] // 4, generator=torch.Generator().manual_seed(args.seed + 2))
    d2f = Diff2Flow("v", zero_snr=False)
    with torch.no_grad():
        mine = d2f.sample(conditioned(unet, context.expand(n, -1, -1)), noise, 50, "diffusion")
        loaded_model = conditioned(ck.unet, ck.empty_context().expand(n, -1, -1))
        ddim = d2f.sample(loaded_model, noise, 50, "diffusion")
        euler = d2f.sample(loaded_model, noise, 50, "diff2flow")
        other = d2f.sample(loaded_model, torch.randn(noise.shape, generator=torch.Generator().manual_seed(args.seed + 3)), 50, "diffusion")
        img_ddim, img_euler = ck.vae.decode(ddim), ck.vae.decode(euler)
    print(f"round trip: all {len(unet.state_dict()) + len(vae.state_dict())} tensors equal, empty context equal, "
          f"DDIM-50 samples of the loaded file differ from the trained model's by {(mine - ddim).abs().max().item():.1e}")
    print(f"latent MSE DDIM-50 vs Diff2Flow Euler-50 (same noise): {F.mse_loss(ddim, euler).item():.4f}; "
          f"vs DDIM-50 from other noise: {F.mse_loss(ddim, other).item():.4f}")
    save_grid(os.path.join(os.path.dirname(args.out), "tiny_prior_samples.png"),
              [to_uint8(to_float(train["rgb"][:n])), to_uint8(img_ddim), to_uint8(img_euler)])
    summary = dict(meta=meta, sample_fd=quality, vae_log=vae_log, unet_log=unet_log, vae_params=n_params(vae), unet_params=n_params(unet),
                   file_mib=os.path.getsize(args.out) / 2 ** 20, fold_err=fold_err, latent_std_after=s_after,
                   mse_ddim_euler=F.mse_loss(ddim, euler).item(), mse_ddim_other=F.mse_loss(ddim, other).item())
    with open(os.path.join(args.work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
