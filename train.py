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
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

import data_t2i
import sample
from tasks import REPORT_ENSEMBLE, VAL_SCENES, DepthTask, ImageTask, sample_numbers
from checkpoint import (RUN_LORA, RUN_STATE, commit_checkpoint, device_problem, find_checkpoint, latest_checkpoint,
                        load_sd_checkpoint, native_res, parse_hw, tidy_run, use_tf32)
from diff2flow import DIFFUSION_CHANGES, OBJECTIVES, Diff2Flow, conditioned
from lora import (CONV_IN, CONV_OUT, PAPER_TRAINED, bake_lora, companion_path, inject_lora, load_lora, lora_metadata,
                  lora_rank, parse_targets, read_metadata, save_lora)
from unet import widen_input_conv

TASKS = ("depth", "t2i", "reflow")
LORA_FILE, STATE_FILE, LOG_FILE = RUN_LORA, RUN_STATE, "log.jsonl"   # checkpoints: checkpoint.py's run folders


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
    p.add_argument("--steps", default=None, type=int, help="optimizer steps (default: 1500 on the tiny prior, 2000 for "
                   "its depth demo; on SD the paper's, 20000, 60000 for reflow)")
    p.add_argument("--batch-size", default=None, type=int, help="per process and micro-step (default 8; 16 for "
                   "depth on the tiny prior)")
    p.add_argument("--grad-accum", default=None, type=int, help="micro-steps per optimizer step (default: 1 on the "
                   "tiny prior; on SD what makes batch x accumulation x processes the paper's: 32 depth, 64 t2i, 128 reflow)")
    p.add_argument("--lr", default=None, type=float, help="peak learning rate (default: 3e-5 on SD as the official "
                   "configs, LoRA or full; on the tiny prior 1e-3 LoRA, 3e-5 full)")
    p.add_argument("--warmup", default=50, type=int, help="linear warm-up steps")
    p.add_argument("--decay", default=None, choices=["cosine", "none"], help="after warm-up: cosine to 10%% or constant "
                   "(default cosine; constant for t2i on SD, as the paper)")
    p.add_argument("--weight-decay", default=0.0, type=float)
    p.add_argument("--ema", default=None, type=float, help="EMA decay of the trained weights (0 = off; default 0.999 "
                   "on SD as the official configs, off on the tiny prior); validation, report and the saved LoRA use the EMA")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA, fp32 on CPU (measured faster there)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (minutes to compile; worth it on a GPU)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--res", default=None, help="training resolution HxW (default: the tiny prior's own, 48x64; 384x512 SD)")
    p.add_argument("--hypersim", default=None, help="Hypersim root as Marigold preprocesses it")
    p.add_argument("--hypersim-split", default=None, help="its split file (default ROOT/filename_list_train.txt)")
    p.add_argument("--vkitti", default=None, help="Virtual KITTI 2 root")
    p.add_argument("--vkitti-split", default=None, help="its split file (default ROOT/vkitti_train.txt)")
    p.add_argument("--train-scenes", default=None, type=int, help="rendered training scenes when no data set is given "
                   f"(default {TINY_TRAIN_SCENES} on the tiny prior, {SD_TRAIN_SCENES} on SD, where they only smoke-test the path)")
    p.add_argument("--data", default=None, help="t2i: image folder with <stem>.txt captions")
    p.add_argument("--manifest", default=None, help="t2i: JSONL manifest {file, text} instead of .txt captions")
    p.add_argument("--caption-dropout", default=None, type=float, help="t2i/reflow: share of empty captions (for CFG; "
                   "default 0.02 for t2i on SD as the official configs, else 0.1)")
    p.add_argument("--pairs", default=None, help="reflow: folder of (noise, latent, caption) shards")
    p.add_argument("--init-lora", default=None, help="fold this LoRA into the prior first (reflow a finetuned model); "
                   "the run records it (path, sha256, a copy) and sample.py rebuilds base + it + the new LoRA")
    p.add_argument("--val-prompts", default=None, help="t2i/reflow: prompt file or prompt for the preview images")
    p.add_argument("--val-samples", default=8, type=int, help="t2i/reflow: held-out noises of the straightness validation")
    p.add_argument("--val-many-steps", default=25, type=int, help="t2i/reflow: steps of the reference trajectory at validation")
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
                   f"(untouched prior and finetuned model, ensemble {REPORT_ENSEMBLE}); 0 = none")
    p.add_argument("--report-steps", default=None, type=int, help="depth: Euler (or DDIM) steps of that table "
                   "(default 2 on SD, the paper's; 1 on the tiny prior, whose depth training times sit near t = 0)")
    p.add_argument("--save-every", default=200, type=int, help="steps between checkpoints")
    p.add_argument("--out", default=None, help="run folder (default: runs/<task>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-at", default=None, type=int, help="stop (and save) after this step; the schedule still "
                   "spans --steps, so --resume later continues exactly (time-limited jobs)")
    p.add_argument("--lora-targets", default=None, help="LoRA target groups: a preset (small: conv,attn,ff,proj; "
                   "base: conv,attn,attn_out) or a comma list of lora.TARGETS; default: the paper's setting for the "
                   "rank (an int: small, the paper's 62 M at 64; a fraction: base, its 222 M 'LoRA base' at 0.2)")
    p.add_argument("--val-data", default=None, help="depth with real data: held-out set KIND:ROOT[:SPLIT] (e.g. "
                   "nyu:data/nyuv2:data/nyuv2/filename_list_test.txt); default Hypersim's validation split "
                   "(HYPERSIM/filename_list_val.txt, or HYPERSIM/../val/filename_list_val.txt as Marigold lays it out)")
    p.add_argument("--val-items", default=VAL_SCENES, type=int, help="depth: held-out items scored at each validation")
    p.add_argument("--cache-dir", default=None, help="depth and t2i: latent cache folder, shared by runs on the same "
                   "checkpoint, data, normalisation and resolution (default: latent_cache/ beside --out)")
    p.add_argument("--no-cache", action="store_true", help="depth: decode and VAE-encode every batch instead "
                   "(DataLoader workers, pinned memory); the cache gives the same batches, encoded once")
    p.add_argument("--workers", default=None, type=int, help="data loading processes (default 4 on SD data, 0 on rendered scenes)")
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
    if args.report_steps is not None and args.report_steps < 1:
        p.error(f"--report-steps {args.report_steps}: at least 1 sampling step")
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
        if args.lora_rank != 0:
            lora_rank(args.lora_rank, 1, 1)
    except ValueError:
        p.error(f"--lora-rank {args.lora_rank}: an int >= 1, a fraction in (0, 1] or 0 (full finetuning)")
    try:
        parse_targets(args.lora_targets, args.lora_rank)
    except ValueError as e:
        p.error(str(e))
    check_numbers(p, args)
    return args


def check_numbers(p, args):
    """Every count and rate up front, one line naming the flag: a 0 would otherwise become a default
    (`args.steps or ...`), divide by zero after minutes of work, or extrapolate (--ema 1.5)."""
    at_least = dict(steps=1, batch_size=1, grad_accum=1, warmup=0, val_every=1, val_steps=1, save_every=1,
                    train_scenes=1, stop_at=1, workers=0, val_items=1, val_samples=2, val_many_steps=1)
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} {value}: must be at least {low}"
                    + (" (leave it out for the default)" if name in ("steps", "batch_size", "val_every") else ""))
    if args.ema is not None and not 0 <= args.ema < 1:
        p.error(f"--ema {args.ema}: an EMA decay in [0, 1), e.g. 0.999 (0 = off)")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr {args.lr}: must be > 0")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        p.error(f"--lora-alpha {args.lora_alpha}: must be > 0 (leave it out for alpha = rank)")
    if args.weight_decay < 0:
        p.error(f"--weight-decay {args.weight_decay}: must be >= 0")
    if args.caption_dropout is not None and not 0 <= args.caption_dropout <= 1:
        p.error(f"--caption-dropout {args.caption_dropout}: a share in [0, 1]")
    if args.res is not None:
        try:
            parse_hw(args.res)
        except ValueError as e:
            p.error(str(e))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file: give a folder for the run (it holds the checkpoints and the log)")
    if args.init_lora and not os.path.isfile(args.init_lora):
        p.error(f"--init-lora {args.init_lora}: no such file (a LoRA .safetensors, e.g. runs/t2i/lora.safetensors)")
    problem = device_problem(args.device)
    if problem:
        p.error(problem)


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
    # depth needs only the empty prompt's embedding (cached beside the checkpoint): no 1.4 GB text encoder
    sd = load_sd_checkpoint(ckpt_path, prediction=args.prediction, with_text_encoder=args.task != "depth")
    tiny = sd.family == "tiny"                         # any small SD-shaped model gets the small defaults
    unet, vae, text_encoder = sd.unet, sd.vae, sd.text_encoder
    context = sd.empty_context()                        # (1, 77, C): the empty prompt
    prediction = sd.prediction
    metadata = init_lora(args, unet, log) if args.init_lora else {}   # e.g. reflow a Diff2Flow-finetuned model
    zero_snr = args.zero_snr
    if zero_snr is None and args.task == "reflow":      # follow the ODE that made the pairs
        zero_snr = data_t2i.pair_settings(args.pairs).get("zero_snr") == "True"
    if zero_snr is None:
        zero_snr = args.objective == "diff2flow" and prediction == "v"
    d2f = Diff2Flow(prediction, bool(zero_snr))
    if args.task == "depth" and unet.cfg.in_channels == unet.cfg.out_channels:   # (a depth --init-lora widened it)
        widen_input_conv(unet, 2 * unet.cfg.in_channels)    # [x_noisy, image_latent]
    for m in (unet, vae, text_encoder):
        if m is not None:
            m.requires_grad_(False).eval()
    if args.lora_rank == 0:
        unet.requires_grad_(True)
        n_lora = 0
    else:
        full = () if args.no_full_convs or args.task != "depth" else (CONV_IN, CONV_OUT)
        preset, groups = parse_targets(args.lora_targets, args.lora_rank)
        n_lora = len(inject_lora(unet, args.lora_rank, args.lora_alpha, targets=groups, full_train=full))
    unet.set_options(use_checkpoint=args.grad_checkpointing)
    n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in unet.parameters())
    log(f"prior: {ckpt_path} ({sd.family}, {prediction}-prediction), task {args.task}, objective {args.objective}, "
        f"zero-SNR {'on' if d2f.zero_snr else 'off'}")
    if bundled:
        log("no SD checkpoint given or found: using the bundled tiny prior" + (" and procedurally rendered scenes"
            if args.task == "depth" else "") + " (pass --ckpt v2-1_768-ema-pruned.safetensors and real data for the paper's setting)")
    what = "full finetuning" if args.lora_rank == 0 else f"LoRA rank {args.lora_rank} on {n_lora} layers ({','.join(groups)})"
    log(f"{what}: {n_train / 1e6:.2f} M of {n_all / 1e6:.2f} M UNet parameters trained")
    if args.lora_rank != 0 and sd.family in ("sd1", "sd2") and preset in PAPER_TRAINED:
        log(f"  the paper's 'LoRA {preset}' setting trains {PAPER_TRAINED[preset] / 1e6:.0f} M (Table 4)")
    if tiny and args.lora_rank != 0 and isinstance(args.lora_rank, int) and args.lora_rank >= unet.cfg.model_channels:
        log(f"note: rank {args.lora_rank} is at or above the tiny UNet's width ({unet.cfg.model_channels}-"
            f"{unet.cfg.model_channels * max(unet.cfg.channel_mult)} channels): close to full rank here")
    info = dict(ckpt=ckpt_path, tiny=tiny, family=sd.family, prediction=prediction, zero_snr=d2f.zero_snr, metadata=metadata,
                native_res=native_res({**sd.metadata, "diff2flow.family": sd.family}, None))
    return unet, vae, text_encoder, context, d2f, info


def init_lora(args, unet, log):
    """--init-lora: fold a LoRA into the prior's plain weights (lora.bake_lora: no LoRA layers remain, so the
    run's own LoRA is injected on a clean model and the init can never be applied twice), keep a copy in the
    run folder, and return the metadata that names it in every checkpoint (path and sha256: sample.py folds
    it in again, checked by the hash). A depth LoRA (input conv widened to 8 channels) can start a depth
    run: the conv is widened first, as when it was trained. Other tasks take the plain UNet's LoRAs."""
    path, meta = args.init_lora, read_metadata(args.init_lora)
    want, have = int(meta.get("diff2flow.unet_in_channels", unet.cfg.in_channels)), unet.cfg.in_channels
    if want == 2 * have and args.task == "depth":
        widen_input_conv(unet, want)
    elif want != have:
        made_for = meta.get("diff2flow.task", "image-conditioned")
        raise ValueError(f"--init-lora {path} is a {made_for} LoRA (its UNet takes {want} input channels), --task "
                         f"{args.task} trains the plain {have}-channel UNet: continue it with `python train.py --task "
                         f"{made_for} --init-lora {path}`, sample it with `python sample.py --run {path}`, or start "
                         f"{args.task} from a {args.task} LoRA")
    files, sha = sample.init_lora_files(path)
    load_lora(path, unet)
    bake_lora(unet)            # plain layers again: the run injects its own LoRA on top
    copy = os.path.join(args.out, sample.INIT_LORA)
    if int(os.environ.get("RANK", 0)) == 0 and os.path.abspath(path) != os.path.abspath(copy):
        os.makedirs(args.out, exist_ok=True)
        for src, dst in zip(files, (copy, companion_path(copy))):
            tmp = f"{dst}.tmp{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        if len(files) == 1 and os.path.exists(companion_path(copy)):
            os.remove(companion_path(copy))
    log(f"initialised from {path} (sha256 {sha[:12]}, folded into the weights; a copy in {copy})")
    return {"diff2flow.init_lora": os.path.abspath(path), "diff2flow.init_lora_sha256": sha}


# On SD the t2i and reflow runs default to the paper's settings (appendix B; the official configs where the
# paper is silent); they fill only what the command line left unset, before apply_defaults fills the rest.
# The tiny prior keeps the demo's.
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


def trained_params(unet):
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def save_run(out, unet, opt, ema, step, args, info):
    """One checkpoint: LoRA (kohya format) or full UNet weights + the training state, written as one set
    into out/ckpt_<step>/ and made the run's latest all at once (checkpoint.commit_checkpoint)."""
    meta = dict(lora_metadata(info["family"] if info["family"] in ("sd1", "sd2") else "sd2", info["prediction"],
                              task=args.task, objective=args.objective, zero_snr=info["zero_snr"]),
                **{"diff2flow.base_checkpoint": os.path.basename(info["ckpt"]), "diff2flow.norm": args.norm,
                   "diff2flow.multires_noise": str(args.multires_noise),
                   "diff2flow.t_density": args.t_density, "diff2flow.lora_targets": str(args.lora_targets),
                   "diff2flow.ema": str(args.ema), "diff2flow.family": info["family"], "diff2flow.step": str(step),
                   "diff2flow.res": "{}x{}".format(*info["res"]), "diff2flow.res_long_edge": str(max(info["res"]))},
                **info.get("metadata", {}))                     # e.g. the --init-lora a reflow started from

    def write(folder):
        with ema_weights(unet, ema):                    # the saved LoRA holds the EMA weights
            save_lora(os.path.join(folder, LORA_FILE), unet, meta)
        live = {n: p.detach().cpu() for n, p in trained_params(unet).items()}
        state = dict(step=step, opt=opt.state_dict(), live=live,
                     ema=None if ema is None else {n: t.cpu() for n, t in ema.items()}, args=vars(args), info=info)
        torch.save(state, os.path.join(folder, STATE_FILE))
    commit_checkpoint(out, step, write)


# settings a resumed run must share with the saved one: they fix the tensors' shapes or what they mean
# (the rest, e.g. --steps, --lr or the data, may change on resume)
RESUME_ARGS = ("task", "objective", "diffusion_changes", "lora_rank", "lora_alpha", "lora_targets", "no_full_convs",
               "norm", "multires_noise", "t_density", "init_lora")
RESUME_INFO = ("family", "prediction", "zero_snr")


def resume_state(args, info, log=print):
    """The training state of args.out's newest complete checkpoint, checked against this run's settings."""
    ckpt = latest_checkpoint(args.out)
    if ckpt is None:
        if os.path.exists(os.path.join(args.out, STATE_FILE)):     # a run folder from before checkpoint folders
            raise SystemExit(f"error: --resume: {args.out} has a state.pt of the old layout: move it, {LORA_FILE} and "
                             f"lora.full.safetensors into {args.out}/ckpt_000000/ and --resume again")
        raise SystemExit(f"error: --resume: no state.pt (no complete checkpoint) in {args.out}; start without --resume")
    path = os.path.join(ckpt, STATE_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises several kinds for short or corrupt files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not readable (truncated or corrupt? {reason}): delete {ckpt} to resume from "
                         f"the run's previous checkpoint, or start without --resume") from None
    saved, saved_info = state.get("args", {}), state.get("info", {})
    for key in RESUME_ARGS:
        mine, theirs = getattr(args, key), saved.get(key)
        if key == "diffusion_changes":
            mine, theirs = tuple(mine), tuple(theirs or ())
        if mine != theirs:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: {args.out} was trained with {flag} {theirs}, this run has {mine}: "
                             f"pass {flag} {theirs} to continue it, or train into another --out")
    for key in RESUME_INFO:
        if info[key] != saved_info.get(key):
            raise ValueError(f"--resume: {args.out} was trained with {key.replace('_', '-')} {saved_info.get(key)} "
                             f"(prior {saved_info.get('ckpt')}), this run has {info[key]} (prior {info['ckpt']}): "
                             f"pass the run's --ckpt, --prediction and --zero-snr, or train into another --out")
    if os.path.basename(info["ckpt"]) != os.path.basename(saved_info.get("ckpt", info["ckpt"])):
        log(f"note: {args.out} was trained on {saved_info['ckpt']}, resuming on {info['ckpt']}")
    return state


def trim_log(path, step):
    """On resume: drop what the killed run logged after its checkpoint (the resumed run logs those steps
    again) and a line torn by the kill, so the log reads as one run."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(json.dumps(rec) + "\n")
    with open(path + f".tmp{os.getpid()}", "w") as f:
        f.writelines(keep)
    os.replace(path + f".tmp{os.getpid()}", path)


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


# What the paper trains with on SD (the official configs where it is silent); batch = per process x
# accumulation x processes. The tiny prior keeps the CPU demo's own (apply_defaults).
SD_DEFAULTS = {
    "depth": dict(batch=32, lr=3e-5, decay="cosine", steps=20_000, caption_dropout=0.0),   # §4.3, SD 2.1
    "t2i": dict(batch=64, lr=1e-5, decay="none", steps=20_000, caption_dropout=0.02),      # Table 1, SD 2.1
    "reflow": dict(batch=128, lr=2e-5, decay="cosine", steps=60_000, caption_dropout=0.1),  # Table 3, SD 1.5
}
SD_BATCH = 8              # per process on SD (a memory estimate for 384x512 on 80 GB); accumulation makes up the rest
TINY_DEPTH_BATCH = 16     # the CPU depth demo: on 2 cores a step at 16 costs about one at 8, and depth gains with samples
TINY_DEPTH_STEPS = 2000   # ... and with steps, up to what fits 10 minutes on 2 cores (README, depth on the tiny prior)
TINY_TRAIN_SCENES = 8000  # rendered scenes are free data: more of them, fewer epochs (README)
SD_TRAIN_SCENES = 2000    # rendered scenes at SD's 384x512 only smoke-test the path (real data is --hypersim/--vkitti)
SD_EMA = 0.999            # the official configs' EMA; validation, sampling and the saved LoRA use it


def apply_defaults(args, info, world, log):
    """Fill what the user left unset: SD_DEFAULTS on SD, the CPU demo's settings on the tiny prior.
    Printed, so a run says what it trains with."""
    tiny = info["tiny"]
    paper = SD_DEFAULTS[args.task]
    if tiny:                 # the demo: its batch in one process, no EMA, LoRA at a CPU-sized learning rate
        depth = args.task == "depth"
        paper = dict(batch=TINY_DEPTH_BATCH if depth else SD_BATCH, lr=1e-3 if args.lora_rank != 0 else 3e-5,
                     decay="cosine", steps=TINY_DEPTH_STEPS if depth else 1500, caption_dropout=0.1)
    for name in ("steps", "lr", "decay", "caption_dropout"):
        if getattr(args, name) is None:
            setattr(args, name, paper[name])
    if args.batch_size is None:
        args.batch_size = paper["batch"] if tiny else max(1, min(SD_BATCH, paper["batch"] // (world * (args.grad_accum or 1))))
    if args.grad_accum is None:
        args.grad_accum = 1 if tiny else max(1, math.ceil(paper["batch"] / (args.batch_size * world)))
    if args.ema is None:
        args.ema = 0.0 if tiny else SD_EMA
    if args.train_scenes is None:
        args.train_scenes = TINY_TRAIN_SCENES if tiny else SD_TRAIN_SCENES
    if args.lora_rank != 0:      # the groups spelled out: what the metadata records and --resume compares
        args.lora_targets = ",".join(parse_targets(args.lora_targets, args.lora_rank)[1])
    if args.val_every is None:
        args.val_every = max(1, args.steps // 4)
    if args.cache_dir is None:
        args.cache_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "latent_cache")
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1) if args.hypersim or args.vkitti else 0
    effective = args.batch_size * args.grad_accum * world
    log(f"batch {effective} per optimizer step = {args.batch_size} per process x {args.grad_accum} accumulation x "
        f"{world} process{'es' if world > 1 else ''}; {args.steps} steps, lr {args.lr:g} ({args.warmup} warm-up, "
        f"{args.decay} decay), EMA {args.ema or 'off'}"
        + (f" (the paper: {paper['batch']})" if not tiny and effective != paper["batch"] else ""))
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
    if args.report_steps is None:
        args.report_steps = 1 if tiny else 2    # one step reads the tiny demo best (README); two, the paper's, on SD


def wrap(unet, world, device, use_compile):
    """(what the step calls, the DDP module for no_sync). DDP first, then torch.compile: compiling the
    DDP-wrapped model splits the graph at its gradient buckets, so backward and communication overlap;
    compiling the UNet before wrapping it would leave DDP one opaque graph to wait for."""
    net = unet
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(net, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    ddp = net
    return (torch.compile(net) if use_compile else net), ddp


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_ddp(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    use_tf32(device)

    unet, vae, text_encoder, context, d2f, info = build(args, log)
    apply_defaults(args, info, world, log)
    logit_normal = t_density(args.t_density)
    for m in (unet, vae, text_encoder):
        if m is not None:
            m.to(device)
    context = context.to(device)
    state = resume_state(args, info, log) if args.resume else None   # checked before any work on data
    os.makedirs(args.out, exist_ok=True)
    if master:
        for name in tidy_run(args.out):
            log(f"removed {os.path.join(args.out, name)} (left by a killed run)")
        if not args.resume and latest_checkpoint(args.out):
            log(f"note: {args.out} holds a checkpoint of an earlier run ({os.path.basename(latest_checkpoint(args.out))}); "
                f"this run replaces it from its first save (--resume continues it instead)")
    if args.task == "depth":
        task = DepthTask(args, vae, context, d2f, info, device, rank, world, log)
    else:
        task = ImageTask(args, vae, text_encoder, context, d2f, info, device, rank, world, log)

    names, params = zip(*trained_params(unet).items())
    # fused AdamW: one kernel over all tensors (measured 3.9x faster than foreach on the CPU too)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), fused=True)
    ema = {n: p.detach().clone() for n, p in zip(names, params)} if args.ema > 0 else None
    start = 0
    if args.resume:
        copy_params(unet, state["live"])
        opt.load_state_dict(state["opt"])
        if ema is not None and state["ema"] is not None:
            ema = {n: t.to(device) for n, t in state["ema"].items()}
        start = state["step"]
        if master:
            trim_log(os.path.join(args.out, LOG_FILE), start)
        log(f"resumed {args.out} at step {start}")

    net, ddp = wrap(unet, world, device, args.compile)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.startswith("cuda"))
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    def evaluated(fn, step):
        """Validation and the report: on every rank (each scores its share), with the EMA weights, in bf16
        where training is."""
        unet.eval()
        with ema_weights(unet, ema), autocast():
            scores = fn(unet, step)
        unet.train()
        return scores

    logf = open(os.path.join(args.out, LOG_FILE), "a") if master else None

    def write_log(rec):
        if logf:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()

    if start == 0:
        base = task.baseline()
        if base is not None:
            write_log(dict(step=0, **base))
        before = evaluated(task.validate, 0)
        log(f"before training: {task.describe(before)}")
        write_log(dict(step=0, kind="val", **before))
        for rec in evaluated(task.report, 0):
            write_log(dict(step=0, **rec))

    unet.train()
    end = min(args.steps, args.stop_at or args.steps)
    task.start(start, end)
    ema_now = None if ema is None else [ema[n] for n in names]
    t0, t_data, loss_sum, n_logged = time.time(), 0.0, torch.zeros((), device=device), 0
    bar = tqdm(range(start, end), initial=start, total=args.steps, disable=not master, desc="train")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        for micro in range(args.grad_accum):
            seed = step_seed(args.seed, step * args.grad_accum + micro, rank)
            t_batch = time.time()
            batch = task.batch(sample_numbers(step, micro, args, rank, world), torch.Generator().manual_seed(seed))
            t_data += time.time() - t_batch
            torch.manual_seed(seed)                      # t and noise: a resumed run draws the same
            sync = world > 1 and micro < args.grad_accum - 1
            with (ddp.no_sync() if sync else nullcontext()), autocast():
                model = conditioned(net, batch["context"], concat=batch["concat"])
                t = None if logit_normal is None else d2f.sample_t(len(batch["x1"]), batch["x1"].device, logit_normal)
                loss = d2f.loss(model, batch["x1"], args.objective, noise=batch["noise"], mask=batch["mask"], t=t,
                                changes=args.diffusion_changes).mean() / args.grad_accum
            loss.backward()
            loss_sum += loss.detach()                    # read every 10 steps: no host sync per step
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:                              # one fused kernel over all tensors
            torch._foreach_lerp_(ema_now, [p.detach() for p in params], 1 - args.ema)
        n_logged += 1
        done = step + 1
        if done % 10 == 0 or done == end:
            sec = time.time() - t0
            rec = dict(step=done, kind="train", loss=loss_sum.item() / n_logged, lr=lr_at(step, args), sec=sec,
                       data_share=t_data / max(sec, 1e-9))
            if device.startswith("cuda"):
                rec["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            bar.set_postfix(loss=f"{rec['loss']:.4f}", data=f"{rec['data_share']:.1%}")
            write_log(rec)
            loss_sum.zero_()
            n_logged = 0
        if done % args.val_every == 0 or done == args.steps:
            scores = evaluated(task.validate, done)
            if master:
                bar.write(f"step {done}: {task.describe(scores)}")
            write_log(dict(step=done, kind="val", **scores))
        if master and (done % args.save_every == 0 or done == end):
            save_run(args.out, unet, opt, ema, done, args, info)
    if end > start:
        log(f"data loading took {t_data / (time.time() - t0):.1%} of the training time ({t_data:.1f} s of "
            f"{time.time() - t0:.1f} s, {'latent cache' if getattr(task, 'caches', None) else 'encoded per step'})")

    if world > 1:
        check_ranks_agree(unet, device, log, write_log)
    if end == args.steps:
        for rec in evaluated(task.report, end):
            write_log(dict(step=end, **rec))
    if master:
        with open(os.path.join(args.out, LOG_FILE)) as f:
            task.summary([json.loads(line) for line in f], log)
        log(f"wrote {os.path.join(args.out, LORA_FILE)} and previews; next: python sample.py"
            + (f" --steps {args.report_steps}" if args.task == "depth" else f" --task t2i --run {args.out} --steps 2"))
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


def check_ranks_agree(unet, device, log, write_log):
    """DDP keeps replicas identical; check it (cheap, and it catches a rank that drifted). On the training
    device: NCCL cannot gather CPU tensors."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().float().flatten() for p in trained_params(unet).values()]).to(device)
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
