"""
Rehearse text-to-image and reflow at full SD shapes on a CPU, before spending GPU hours (issue #21).

    python rehearse_t2i.py                    # all stages, ~10 minutes on 2 cores, < 9 GB
    python rehearse_t2i.py --part memory      # only the memory-flatness probe (1k vs 10k items)

It writes random-weight SD 1.5 (eps, CLIP ViT-L text encoder under HF names) and SD 2.1 (v, OpenCLIP
ViT-H) single files with every key the released files hold, then runs the real commands as
subprocesses, each timed and with its peak resident memory:
  1. SD 1.5: pairs from a rank-64 LoRA (as from a Diff2Flow finetune), killed after the first shard
     and resumed; 2. reflow on them with --init-lora; 3. sampling the reflowed run;
  4. SD 2.1: t2i from an image folder with captions (latents cached on disk), then sampling it;
  5. memory of pair loading and latent caching at two sizes: it must not grow with the count.
The rehearsal shrinks what the paper scales (say so next to any number): a handful of prompts,
2 sampling steps instead of 40, 256x256 images (32x32 latents), batch 1, 2 training steps.
`write_random_sd_checkpoint` is importable (the depth rehearsal uses it).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

# LDM's schedule buffers and EMA scalars: in the released files, read by no module here
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
UNET_PARAMS = {"sd1": 859_520_964, "sd2": 865_910_724}


def ldm_schedule_buffers(v_posterior=0.0):
    """The buffers LDM's DDPM.register_schedule stores (linear-in-sqrt betas, 1000 steps), fp32."""
    from schedule import BETA_END, BETA_START, T
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post = (1 - v_posterior) * betas * (1 - prev) / (1 - ac) + v_posterior * betas
    buf = dict(betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=prev, sqrt_alphas_cumprod=ac.sqrt(),
               sqrt_one_minus_alphas_cumprod=(1 - ac).sqrt(), log_one_minus_alphas_cumprod=(1 - ac).log(),
               sqrt_recip_alphas_cumprod=(1 / ac).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / ac - 1).sqrt(),
               posterior_variance=post, posterior_log_variance_clipped=post.clamp(min=1e-20).log(),
               posterior_mean_coef1=betas * prev.sqrt() / (1 - ac), posterior_mean_coef2=(1 - prev) * (1 - betas).sqrt() / (1 - ac))
    assert tuple(buf) == SCHEDULE_KEYS
    return {k: v.float() for k, v in buf.items()}


def _random_fp16(module, seed):
    """Build on meta, materialise in fp16, fill: norm weights 1, biases 0, matrices N(0, 1/fan_in)."""
    module = module.half().to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if name.endswith("weight") or "logit_scale" in name else 0.0)
        for name, b in module.named_buffers():
            b.zero_()
    return module


def write_random_sd_checkpoint(path, family):
    """A random-weight single file in the released layout: 'sd1' = SD 1.5 (eps; UNet, KL VAE, CLIP ViT-L
    under HF names with position_ids), 'sd2' = SD 2.1 768-v (v; OpenCLIP ViT-H text tower under open_clip
    names); plus LDM's schedule buffers and model_ema.decay/num_updates, no metadata (as the real files).
    Weights fp16 (the buffers fp32). Returns the path."""
    from checkpoint import SD1_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
    from safetensors.torch import save_file
    from text_encoder import SD1_TEXT, SD2_TEXT, TextEncoder, open_clip_to_hf_clip
    from unet import SD1_UNET, SD2_UNET, UNetModel
    from vae import AutoencoderKL, VAEConfig
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be 'sd1' or 'sd2', got {family!r}")
    with torch.device("meta"):
        unet = UNetModel(SD1_UNET if family == "sd1" else SD2_UNET)
        vae = AutoencoderKL(VAEConfig())
        text = TextEncoder(SD1_TEXT if family == "sd1" else SD2_TEXT)
    sd = {UNET_PREFIX + k: v for k, v in _random_fp16(unet, 1).state_dict().items()}
    sd.update({VAE_PREFIX + k: v for k, v in _random_fp16(vae, 2).state_dict().items()})
    tsd = _random_fp16(text, 3).state_dict()
    if family == "sd1":
        hf = open_clip_to_hf_clip(tsd, SD1_TEXT.layers)
        hf["embeddings.position_ids"] = torch.arange(77)[None]
        sd.update({SD1_TEXT_PREFIX + k: v for k, v in hf.items()})
    else:
        sd.update({"cond_stage_model." + k: v for k, v in tsd.items()})
    sd.update(ldm_schedule_buffers())
    sd["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------
# Memory probe: pair loading and latent caching, peak resident memory against the item count

def status_mb(field):
    """A line of /proc/self/status in MB: VmHWM (peak resident), RssAnon (heap, now), RssFile (mapped files, now)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_mb():
    return status_mb("VmHWM")


def probe(folder, n, hw=64, batch=64, shard_size=64):
    """In this process: write n pairs (4x32x32 noise and latent) and read them all once in epoch order
    as training does; then write n hw x hw images with captions, cache their latents (a stub 8x average
    pool stands in for the VAE) and read those. Returns, after each, the peak resident memory (MB) and the
    largest anonymous (heap) memory seen between batches; the rest of the peak is memory-mapped shard
    pages, which the kernel may drop, bounded by shards.OPEN_SHARDS open shards."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    import data_t2i
    import shards
    from data import EpochMix
    out = {"n": n, "start_mb": peak_mb(), "start_anon_mb": status_mb("RssAnon")}
    anon = out["start_anon_mb"]
    pairs = os.path.join(folder, "pairs")
    g = torch.Generator().manual_seed(0)
    shards.build(pairs, data_t2i.PAIRS, n, shard_size, lambda idx: (
        {"noise": torch.randn(len(idx), 4, 32, 32, generator=g).half(), "latent": torch.randn(len(idx), 4, 32, 32, generator=g).half()},
        {"caption": [f"prompt {i}" for i in idx]}), key="probe")
    rows, mix, total = data_t2i.ReflowPairs(pairs), EpochMix([n]), 0.0
    for s in range(0, n, batch):
        idx = [mix(k)[1] for k in range(s, min(n, s + batch))]
        b = rows.rows(idx, ["noise", "latent"])
        total += float(b["latent"].float().sum()) + len(rows.strings("caption", idx))
        anon = max(anon, status_mb("RssAnon"))
    out.update(pairs_mb=peak_mb(), pairs_anon_mb=anon, pairs_file_mb=status_mb("RssFile"))
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((hw, hw, 3)) * 255).astype(np.uint8)).save(os.path.join(images, f"{i:06d}.bmp"))
        with open(os.path.join(images, f"{i:06d}.txt"), "w") as f:
            f.write(f"caption {i}")
    dataset = data_t2i.CaptionFolder(images, (hw, hw), caption_dropout=0)
    stub = lambda rgb: F.pad(F.avg_pool2d(rgb, 8), (0, 0, 0, 0, 0, 1))      # (B, 4, hw/8, hw/8)
    cache = os.path.join(folder, "latents")
    data_t2i.cache_latents(dataset, stub, cache, "probe", shard_size=shard_size)
    anon = max(anon, status_mb("RssAnon"))
    lat = data_t2i.LatentCache(cache, "probe")
    for s in range(0, n, batch):
        idx = [mix(k)[1] for k in range(s, min(n, s + batch))]
        total += float(lat.rows(idx, ["latent"])["latent"].float().sum())
        anon = max(anon, status_mb("RssAnon"))
    out.update(cache_mb=peak_mb(), cache_anon_mb=anon, cache_file_mb=status_mb("RssFile"))
    return out


def run_probe(n, folder, hw=64, shard_size=16):
    """probe() in a fresh process (peak memory is per process); returns its dict. With shard_size rows per
    shard, the mapped pages reach their bound (OPEN_SHARDS shards) by 64 * shard_size items."""
    os.makedirs(folder, exist_ok=True)
    res = subprocess.run([PY, os.path.abspath(__file__), "--probe", str(n), "--dir", folder, "--hw", str(hw),
                          "--shard-size", str(shard_size)],
                         capture_output=True, text=True, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode:
        raise RuntimeError(f"memory probe failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# Stages: the real commands as subprocesses, timed, with peak memory

def run(name, args, log, kill_when=None):
    """Run `python args...` in HERE; with kill_when (a function), SIGKILL it once that returns True.
    Returns (seconds, peak RSS in GB, killed)."""
    t0 = time.time()
    proc = subprocess.Popen([PY, *args], cwd=HERE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if kill_when is not None and not killed and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    if code and not killed:
        raise RuntimeError(f"stage {name} failed (exit {code}); see {log}")
    return time.time() - t0, usage.ru_maxrss / 2 ** 20, killed


def check_checkpoint(path, family):
    """Load a written file as train.py does: the released family, the UNet's parameter count, and only the
    schedule buffers and EMA scalars left unread."""
    from checkpoint import load_sd_checkpoint
    sd = load_sd_checkpoint(path)
    n = sum(p.numel() for p in sd.unet.parameters())
    want_ignored = set(SCHEDULE_KEYS) | {"model_ema.decay", "model_ema.num_updates"}
    assert sd.family == family and n == UNET_PARAMS[family], (sd.family, n)
    assert set(sd.ignored) == want_ignored, sorted(set(sd.ignored) ^ want_ignored)
    assert sd.prediction == {"sd1": "eps", "sd2": "v"}[family] and sd.text_encoder is not None
    return dict(family=family, unet_params=n, text_params=sum(p.numel() for p in sd.text_encoder.parameters()))


def write_random_lora(ckpt, path, rank=64):
    """A rank-64 LoRA with a non-zero update, as a Diff2Flow t2i finetune of `ckpt` would leave one."""
    from checkpoint import load_sd_checkpoint
    from lora import inject_lora, lora_layers, lora_metadata, save_lora
    sd = load_sd_checkpoint(ckpt, with_text_encoder=False)
    inject_lora(sd.unet, rank)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, m in lora_layers(sd.unet):                     # up = 0 at init: give every layer an update
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 1e-3)
    meta = lora_metadata(sd.family, sd.prediction, task="t2i", objective="diff2flow")
    meta.update({"diff2flow.base_checkpoint": os.path.basename(ckpt), "diff2flow.res_long_edge": "256"})
    save_lora(path, sd.unet, meta)


def write_caption_folder(folder, n=4):
    """n photo-sized random images (different sizes and aspect ratios) with a caption file each."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (384, 512) if i % 2 else (600, 400)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"photo{i}.png"))
        with open(os.path.join(folder, f"photo{i}.txt"), "w") as f:
            f.write(f"a photo of object number {i}, high detail")


def sd_stages(work):
    """The real commands at full SD shapes (see the module docstring), each a timed subprocess."""
    import shards
    log = os.path.join(work, "rehearsal.log")
    sd15, sd21 = os.path.join(work, "sd15.safetensors"), os.path.join(work, "sd21.safetensors")
    init, pairs = os.path.join(work, "t2i_sd15_lora.safetensors"), os.path.join(work, "pairs")
    reflow, t2i, photos = os.path.join(work, "reflow"), os.path.join(work, "t2i"), os.path.join(work, "photos")
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("a lighthouse at dusk\na red cube on a table\na portrait of a cat, oil painting\n")
    write_caption_folder(photos)
    for path in (pairs, reflow, t2i):
        shutil.rmtree(path, ignore_errors=True)
    me = os.path.abspath(__file__)
    small = ["--val-samples", "2", "--val-steps", "1", "--val-many-steps", "2", "--val-every", "1000"]   # validation before and after: 2 noises, 1 vs 2 steps
    stages = []

    def stage(name, args, note, **kw):
        sec, gb, killed = run(name, args, log, **kw)
        stages.append(dict(stage=name, seconds=round(sec, 1), peak_gb=round(gb, 2), killed=killed, note=note))
        print(f"{name:34s} {sec:7.1f} s  peak {gb:5.2f} GB  {note}", flush=True)

    stage("write SD 1.5 (random, fp16)", [me, "--write", "sd1", sd15], "every key of v1-5-pruned-emaonly")
    stage("write SD 2.1 (random, fp16)", [me, "--write", "sd2", sd21], "every key of v2-1_768-ema-pruned")
    stage("SD 1.5 t2i LoRA (random, rank 64)", [me, "--write-lora", sd15, init], "stands in for a Diff2Flow finetune")
    cmd = ["sample.py", "--task", "t2i", "--ckpt", sd15, "--run", init, "--save-pairs", pairs, "--prompt", prompts,
           "--num", "6", "--shard-size", "2", "--batch-size", "2", "--steps", "2", "--res", "256x256"]
    first = shards.shard_path(pairs, "pairs", 0)
    stage("pairs, killed after shard 0", cmd, "6 pairs, 2 steps (paper 40), CFG 7.5, 32x32 latents",
          kill_when=lambda: os.path.exists(first))
    assert os.path.exists(first) and not os.path.exists(shards.shard_path(pairs, "pairs", 2)), "the kill came too late"
    mtime = os.path.getmtime(first)
    stage("pairs, resumed", cmd, "makes only the missing shards")
    assert os.path.getmtime(first) == mtime and len(glob_shards(pairs)) == 3, "resume redid a whole shard"
    stage("reflow SD 1.5 --init-lora", ["train.py", "--task", "reflow", "--ckpt", sd15, "--pairs", pairs, "--init-lora", init,
                                        "--steps", "2", "--batch-size", "1", "--grad-accum", "1", *small, "--out", reflow],
          "rank 64 (the paper's 61 M), batch 1 (paper 128), 2 steps (paper 60k), validation before and after")
    stage("sample the reflowed run", ["sample.py", "--task", "t2i", "--run", reflow, "--ckpt", sd15, "--prompt",
                                      "a lighthouse at dusk", "--num", "1", "--steps", "2", "--out", os.path.join(reflow, "s")],
          "base + init LoRA + reflow LoRA, 2 steps, 256x256")
    stage("t2i SD 2.1 from a caption folder", ["train.py", "--task", "t2i", "--ckpt", sd21, "--data", photos, "--res", "256x256",
                                               "--steps", "3", "--batch-size", "1", "--grad-accum", "1", *small, "--out", t2i],
          "4 photos cached as latents, rank 64, batch 1 (paper 64), 3 steps (paper 20k)")
    stage("sample the t2i run", ["sample.py", "--task", "t2i", "--run", t2i, "--ckpt", sd21, "--prompt", "a photo of a cat",
                                 "--num", "1", "--steps", "2", "--out", os.path.join(t2i, "s")], "2 steps, 256x256")
    return stages


def glob_shards(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="all", choices=["all", "sd", "memory"])
    p.add_argument("--work", default="runs/rehearse_t2i", help="where the files and logs go (several GB)")
    p.add_argument("--counts", default="1000,10000", help="memory probe: the two item counts")
    p.add_argument("--probe", default=None, type=int, help=argparse.SUPPRESS)
    p.add_argument("--write", nargs=2, default=None, metavar=("FAMILY", "PATH"), help="only write (and check) one random SD file")
    p.add_argument("--write-lora", nargs=2, default=None, metavar=("CKPT", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hw", default=64, type=int, help=argparse.SUPPRESS)
    p.add_argument("--shard-size", default=16, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write:
        write_random_sd_checkpoint(args.write[1], args.write[0])
        print(check_checkpoint(args.write[1], args.write[0]))
        return
    if args.write_lora:
        write_random_lora(*args.write_lora)
        return
    if args.probe is not None:
        print(json.dumps(probe(args.dir, args.probe, args.hw, shard_size=args.shard_size)))
        return
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    results = {}
    if args.part in ("all", "sd"):
        results["stages"] = sd_stages(work)
    if args.part in ("all", "memory"):
        counts = [int(c) for c in args.counts.split(",")]
        results["memory"] = [run_probe(n, os.path.join(work, f"probe_{n}")) for n in counts]
        for r in results["memory"]:
            print(f"memory, {r['n']} items: start {r['start_mb']:.0f} MB; pairs read: peak {r['pairs_mb']:.0f} MB, heap "
                  f"{r['pairs_anon_mb']:.0f} MB; latents cached and read: peak {r['cache_mb']:.0f} MB, heap {r['cache_anon_mb']:.0f} MB")
        for n in counts:
            shutil.rmtree(os.path.join(work, f"probe_{n}"), ignore_errors=True)
    with open(os.path.join(work, "rehearsal.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
