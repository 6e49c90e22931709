"""
Finetune Stable Diffusion with the Diff2Flow objective (or the two baselines): one loop for every task.

    python train.py --task depth --lora-rank 64                      # bundled tiny prior, rendered scenes
    python train.py --task depth --ckpt v2-1_768-ema-pruned.safetensors --hypersim DIR --vkitti DIR
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
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
from checkpoint import load_sd_checkpoint
from diff2flow import DIFFUSION_CHANGES, OBJECTIVES, Diff2Flow, conditioned
from lora import CONV_IN, CONV_OUT, inject_lora, load_lora, lora_metadata, save_lora
from unet import widen_input_conv

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_PRIOR = os.path.join(HERE, "assets", "tiny_prior.safetensors")
SD_FILENAMES = ("v2-1_768-ema-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors")
TASKS = ("depth",)
LORA_FILE, STATE_FILE, LOG_FILE = "lora.safetensors", "state.pt", "log.jsonl"
VAL_SCENES = 64          # held-out rendered scenes for validation (disjoint seeds from training)


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
    p.add_argument("--steps", default=None, type=int, help="optimizer steps (default: 600 on the tiny prior, 20000 on SD)")
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
    p.add_argument("--norm", default="log", choices=["log", "affine"], help="depth normalisation (log 1/99%% or affine 2/98%%)")
    p.add_argument("--val-every", default=None, type=int, help="steps between validations (default: steps // 4)")
    p.add_argument("--val-steps", default=4, type=int, help="Euler (or DDIM) steps at validation")
    p.add_argument("--save-every", default=200, type=int, help="steps between checkpoints")
    p.add_argument("--out", default=os.path.join("runs", "depth"), help="run folder")
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
    try:
        args.lora_rank = float(args.lora_rank) if "." in args.lora_rank else int(args.lora_rank)
    except ValueError:
        p.error(f"--lora-rank must be an int, a fraction or 0, got {args.lora_rank!r}")
    return args


def find_checkpoint(path):
    """The checkpoint to finetune: the given path, a known SD file nearby, or the bundled tiny prior."""
    if path is not None:
        return path, False
    for folder in (".", "checkpoints"):
        for name in SD_FILENAMES:
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name), False
    if not os.path.exists(TINY_PRIOR):
        raise FileNotFoundError(f"no SD checkpoint given (--ckpt) or found, and the bundled tiny prior "
                                f"{TINY_PRIOR} is missing: restore it from git or pass --ckpt")
    return TINY_PRIOR, True


# ---------------------------------------------------------------------------------------------------
# The model: prior UNet (+ widened input conv) + LoRA, the frozen VAE, the empty-prompt context

def build(args, log=print):
    ckpt_path, tiny = find_checkpoint(args.ckpt)
    sd = load_sd_checkpoint(ckpt_path, prediction=args.prediction)
    unet, vae = sd.unet, sd.vae
    context = sd.empty_context()                        # (1, 77, C): depth is conditioned on the empty prompt
    prediction = sd.prediction
    zero_snr = bool(args.zero_snr) if args.zero_snr is not None else (args.objective == "diff2flow" and prediction == "v")
    d2f = Diff2Flow(prediction, zero_snr)
    widen_input_conv(unet, 2 * unet.cfg.in_channels)    # [x_noisy, image_latent]
    unet.requires_grad_(False)
    vae.requires_grad_(False).eval()
    if args.lora_rank == 0:
        unet.requires_grad_(True)
        n_lora = 0
    else:
        full = () if args.no_full_convs else (CONV_IN, CONV_OUT)
        n_lora = len(inject_lora(unet, args.lora_rank, args.lora_alpha, full_train=full))
    unet.set_options(use_checkpoint=args.grad_checkpointing)
    n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in unet.parameters())
    log(f"prior: {ckpt_path} ({sd.family}, {prediction}-prediction), objective {args.objective}, "
        f"zero-SNR {'on' if zero_snr else 'off'}")
    if tiny:
        log("no SD checkpoint given or found: using the bundled tiny prior and procedurally rendered scenes "
            "(pass --ckpt v2-1_768-ema-pruned.safetensors and real data for the paper's setting)")
    what = "full finetuning" if args.lora_rank == 0 else f"LoRA rank {args.lora_rank} on {n_lora} layers"
    log(f"{what}: {n_train / 1e6:.2f} M of {n_all / 1e6:.2f} M UNet parameters trained")
    if tiny and args.lora_rank != 0 and isinstance(args.lora_rank, int) and args.lora_rank >= unet.cfg.model_channels:
        log(f"note: rank {args.lora_rank} is at or above the tiny UNet's width ({unet.cfg.model_channels}-"
            f"{unet.cfg.model_channels * max(unet.cfg.channel_mult)} channels): close to full rank here")
    info = dict(ckpt=ckpt_path, tiny=tiny, family=sd.family, prediction=prediction, zero_snr=zero_snr)
    return unet, vae, context, d2f, info


# ---------------------------------------------------------------------------------------------------
# Depth data: rendered scenes or the real sets, encoded to latents once

def parse_res(res, tiny):
    if res is None:
        return (96, 128) if tiny else (384, 512)
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
                   "diff2flow.family": info["family"], "diff2flow.step": str(step),
                   "diff2flow.res_long_edge": str(max(info["res"]))})
    live = {n: p.detach().clone() for n, p in trained_params(unet).items()}
    if ema is not None:                                 # the saved weights are the EMA weights
        with torch.no_grad():
            for n, p in trained_params(unet).items():
                p.copy_(ema[n])
    save_lora(os.path.join(out, LORA_FILE), unet, meta)
    if ema is not None:
        with torch.no_grad():
            for n, p in trained_params(unet).items():
                p.copy_(live[n])
    state = dict(step=step, opt=opt.state_dict(), live={n: t.cpu() for n, t in live.items()},
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

    unet, vae, context, d2f, info = build(args, log)
    tiny = info["tiny"]
    args.steps = args.steps or (600 if tiny else 20000)
    args.batch_size = args.batch_size or (8 if tiny else 2)
    args.lr = args.lr or (3e-5 if args.lora_rank == 0 else (1e-3 if tiny else 1e-4))
    args.val_every = args.val_every or max(1, args.steps // 4)
    unet.to(device)
    vae.to(device)
    context = context.to(device)
    os.makedirs(args.out, exist_ok=True)

    import sample   # validation = the sampling code users run (imported late: it imports this file)
    hw = parse_res(args.res, tiny)
    info["res"] = hw
    train_set, heldout = depth_sets(args, hw)
    cached = None
    if isinstance(train_set, data.RenderedDepthDataset):
        key = (info["ckpt"], os.path.getmtime(info["ckpt"]), len(train_set), hw, args.norm)
        cached = cache_latents(vae, train_set, args.norm, device, key)
        log(f"training on {len(train_set)} rendered scenes at {hw[0]}x{hw[1]}, latents {tuple(cached[0].shape[1:])}")

    params = list(trained_params(unet).values())
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999),
                            **({"fused": True} if fused else {"foreach": True}))
    ema = {n: p.detach().clone() for n, p in trained_params(unet).items()} if args.ema > 0 else None
    start = 0
    state_path = os.path.join(args.out, STATE_FILE)
    if args.resume:
        if not os.path.exists(state_path):
            raise SystemExit(f"--resume: no {STATE_FILE} in {args.out}; start without --resume")
        state = torch.load(state_path, map_location=device, weights_only=True)
        with torch.no_grad():
            for n, p in trained_params(unet).items():
                p.copy_(state["live"][n])
        opt.load_state_dict(state["opt"])
        if ema is not None and state["ema"] is not None:
            ema = {n: t.to(device) for n, t in state["ema"].items()}
        start = state["step"]
        log(f"resumed {args.out} at step {start}")

    net = unet
    if args.compile:
        net = torch.compile(unet)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(net, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.startswith("cuda"))
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    def batch_at(step, micro):
        g = torch.Generator().manual_seed(step_seed(args.seed, step * args.grad_accum + micro, rank))
        if cached is not None:
            idx = torch.randint(len(cached[0]), (args.batch_size,), generator=g)
            return tuple(t[idx].to(device) for t in cached)
        idx = torch.randint(len(train_set), (args.batch_size,), generator=g).tolist()
        return encode_depth_items(vae, [train_set[i] for i in idx], args.norm, device)

    def validate(step):
        unet.eval()
        live = None
        if ema is not None:
            live = {n: p.detach().clone() for n, p in trained_params(unet).items()}
            with torch.no_grad():
                for n, p in trained_params(unet).items():
                    p.copy_(ema[n])
        scores = sample.evaluate_heldout(unet, vae, d2f, context, heldout, args.objective, args.val_steps,
                                         norm=args.norm, preview=os.path.join(args.out, f"preview_{step:06d}.png"))
        if live is not None:
            with torch.no_grad():
                for n, p in trained_params(unet).items():
                    p.copy_(live[n])
        unet.train()
        return scores

    logf = open(os.path.join(args.out, LOG_FILE), "a") if master else None

    def write_log(rec):
        if logf:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()

    if master and start == 0:
        trivial = sample.evaluate_trivial(train_set, heldout, args.norm)
        prior = validate(0)
        log(f"held-out before training: AbsRel {prior['abs_rel']:.4f} δ1 {prior['delta1']:.4f}; "
            f"trivial baseline (mean training depth map) AbsRel {trivial['abs_rel']:.4f} δ1 {trivial['delta1']:.4f}")
        write_log(dict(step=0, kind="val", **prior))
        write_log(dict(step=0, kind="trivial", **trivial))

    unet.train()
    t0, losses = time.time(), []
    end = min(args.steps, args.stop_at or args.steps)
    bar = tqdm(range(start, end), initial=start, total=args.steps, disable=not master, desc="train")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        for micro in range(args.grad_accum):
            img, dep, mask = batch_at(step, micro)
            torch.manual_seed(step_seed(args.seed, step * args.grad_accum + micro, rank))   # t and noise
            sync = world > 1 and micro < args.grad_accum - 1
            with (net.no_sync() if sync else nullcontext()), autocast():
                model = conditioned(net, context.expand(img.shape[0], -1, -1), concat=img)
                loss = d2f.loss(model, dep, args.objective, mask=mask, changes=args.diffusion_changes).mean() / args.grad_accum
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
        if master and (done % 10 == 0 or done == args.steps):
            rec = dict(step=done, kind="train", loss=float(np.mean(losses)), lr=lr_at(step, args),
                       sec=time.time() - t0)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            write_log(rec)
            losses = []
        if master and (done % args.val_every == 0 or done == args.steps):
            scores = validate(done)
            bar.write(f"step {done}: held-out AbsRel {scores['abs_rel']:.4f} δ1 {scores['delta1']:.4f}")
            write_log(dict(step=done, kind="val", **scores))
        if master and (done % args.save_every == 0 or done == end):
            save_run(args.out, unet, opt, ema, done, args, info)

    if world > 1:
        check_ranks_agree(unet, log, write_log)
    if master:
        final = [json.loads(l) for l in open(os.path.join(args.out, LOG_FILE)) if '"val"' in l][-1]
        trivial = [json.loads(l) for l in open(os.path.join(args.out, LOG_FILE)) if '"trivial"' in l][-1]
        before = [json.loads(l) for l in open(os.path.join(args.out, LOG_FILE)) if '"val"' in l][0]
        log(f"\nheld-out depth ({len(heldout)} scenes, {args.val_steps} steps, alignment in {'log' if args.norm == 'log' else 'depth'} space):")
        log(f"  {'':32s} AbsRel ↓   δ1 ↑")
        for name, r in (("untouched prior", before), ("trivial baseline (mean depth map)", trivial), (f"finetuned ({args.objective})", final)):
            log(f"  {name:32s} {r['abs_rel']:.4f}    {r['delta1']:.4f}")
        log(f"wrote {os.path.join(args.out, LORA_FILE)} and previews; next: python sample.py --steps 2")
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


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
