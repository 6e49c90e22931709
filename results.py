"""
Regenerate the README's results on the bundled tiny prior: the paper's claims in miniature, on a CPU.

    python results.py                  # about 2.5 hours on 2 CPU cores; run it again to continue
    python results.py --part depth     # one part: alignment | transfer | ceiling | depth | shift | reflow

Finished runs are kept under results/runs/ and skipped; an interrupted one resumes from its last
checkpoint. Everything lands in results/: one JSON per part, the figures, and RESULTS.md with the
tables the README shows.
  1. alignment: the untouched prior through Diff2Flow's Euler sampler against DDIM on its own trailing
     grid, from the same noise (close), against naive FM (far); with and without the zero-SNR rescale.
  2. transfer: does the prior know anything? The demo's depth finetuning from the prior and from the same
     architecture with random weights (same VAE, same file layout), equal steps, 3 seeds each.
     ceiling: how much depth a plain regressor reads from these pixels at all (no prior), 3 seeds.
  3. depth: LoRA of rank 4 (small against the UNet's 32-64 channels) and full finetuning, equal
     steps, for the three objectives (3 seeds for LoRA), held-out AbsRel/δ1 against training steps
     (the paper's Fig. 8b in miniature), and an ablation: Diff2Flow's changes added to `diffusion` one
     at a time.
  4. shift: the paper's Fig. 5 in miniature. LoRA-finetune the prior towards scenes under another light
     (dusk: warmer, darker) with each objective, 3 seeds, and follow the Fréchet distance (fd.py) of its
     samples to held-out dusk scenes against steps.
  5. reflow: 2-step samples before and after reflow on held-out noise (see sample.py --save-pairs).
"""
import argparse
import functools
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tasks
import train
from checkpoint import TINY_PRIOR, native_res
from lora import read_metadata

OUT = "results"
RUNS = os.path.join(OUT, "runs")
LORA_SEEDS = (0, 1, 2)
OBJECTIVE_NAMES = ("diffusion", "fm", "diff2flow")
COLORS = dict(diffusion="tab:blue", fm="tab:orange", diff2flow="tab:green")      # one colour per objective, every plot
# Diff2Flow = diffusion + these (DESIGN.md); each added alone to `diffusion` (1 seed each)
ABLATION = {"+ zero-SNR end": ["--zero-snr", "1"], "+ continuous τ": ["--diffusion-changes", "continuous"],
            "+ timestep density": ["--diffusion-changes", "density"], "+ loss weight": ["--diffusion-changes", "weight"]}


@functools.lru_cache(maxsize=None)
def prior_hw(latent=False):
    """The bundled prior's image size (tiny.py records it), or its latent size (the VAE downsamples 4x)."""
    h, w = native_res(read_metadata(TINY_PRIOR), None)
    return (h // 4, w // 4) if latent else (h, w)


@functools.lru_cache(maxsize=None)
def prior_stamp():
    """sha256 of the bundled prior's tensors (names, dtypes, shapes, bytes; not its metadata): a result
    holds only for the weights it was made from."""
    import hashlib
    from safetensors import safe_open
    h = hashlib.sha256()
    with safe_open(TINY_PRIOR, framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def scenes_stamp():
    """sha256 of a few rendered training and held-out scenes at the prior's size: what the ceiling part
    depends on (it never touches the prior), so a new prior on the same scenes keeps it."""
    import hashlib
    import data
    h = hashlib.sha256()
    for split in ("train", "heldout"):
        ds = data.RenderedDepthDataset.split(split, 8, *prior_hw())
        for i in range(len(ds)):
            h.update(ds[i]["rgb"].numpy().tobytes())
            h.update(ds[i]["depth"].numpy().tobytes())
    return h.hexdigest()


def save_json(obj, name, stamp=prior_stamp):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(prior=stamp(), result=obj), f, indent=1)
    os.replace(path + ".tmp", path)


def load_json(name, stamp=prior_stamp):
    """What save_json wrote, or None when it is missing or was made from another prior (or other scenes)."""
    path = os.path.join(OUT, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    return saved["result"] if isinstance(saved, dict) and saved.get("prior") == stamp() else None


# ---------------------------------------------------------------------------------------------------
# 1. Step-0 alignment

@torch.no_grad()
def alignment(n=32, step_counts=(4, 10, 50)):
    from checkpoint import load_sd_checkpoint
    from diff2flow import Diff2Flow, conditioned
    from schedule import Schedule, ddim_sample
    sd = load_sd_checkpoint(TINY_PRIOR)
    unet, vae = sd.unet, sd.vae
    model = conditioned(unet, sd.empty_context().expand(n, -1, -1))
    c = unet.cfg.in_channels
    h, w = prior_hw(latent=True)
    noise = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))
    other = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))
    decode = lambda z: vae.decode(z).clamp(-1, 1)
    mse = lambda a, b: float(((a - b) ** 2).mean())
    rows, images = [], {}
    for steps in step_counts:
        ddim = decode(ddim_sample(model, noise, Schedule(False), sd.prediction, steps=steps))
        rec = dict(steps=steps,
                   d2f=mse(decode(Diff2Flow(sd.prediction, False).sample(model, noise, steps)), ddim),
                   d2f_zero_snr=mse(decode(Diff2Flow(sd.prediction, True).sample(model, noise, steps)), ddim),
                   naive_fm=mse(decode(Diff2Flow(sd.prediction).sample(model, noise, steps, "fm")), ddim),
                   unrelated=mse(decode(ddim_sample(model, other, Schedule(False), sd.prediction, steps=steps)), ddim))
        rows.append(rec)
        print(f"alignment, {steps} steps: MSE to DDIM  Diff2Flow {rec['d2f']:.4f}  (zero-SNR {rec['d2f_zero_snr']:.4f})  "
              f"naive FM {rec['naive_fm']:.4f}  other noise {rec['unrelated']:.4f}")
        if steps == max(step_counts):
            images = dict(ddim=ddim, d2f=decode(Diff2Flow(sd.prediction, False).sample(model, noise, steps)),
                          fm=decode(Diff2Flow(sd.prediction).sample(model, noise, steps, "fm")))
    save_grid(os.path.join(OUT, "alignment.png"), [images[k][:8] for k in ("ddim", "d2f", "fm")])
    save_json(rows, "alignment.json")
    return rows


# ---------------------------------------------------------------------------------------------------
# 2. Transfer: the prior against the same UNet with random weights

TRANSFER_SEEDS = (0, 1, 2)
RANDOM_UNET = os.path.join(OUT, "random_unet.safetensors")


def random_unet_checkpoint(path=RANDOM_UNET, seed=0):
    """The prior's file with its UNet drawn afresh (unet.py's initialisation): the same architecture, VAE,
    empty-prompt embedding and loader path, nothing learned."""
    from checkpoint import load_sd_checkpoint, save_sd_checkpoint
    from unet import UNetModel
    if not os.path.exists(path) or read_metadata(path).get("diff2flow.results.prior_sha256") != prior_stamp():
        sd = load_sd_checkpoint(TINY_PRIOR)
        torch.manual_seed(seed)
        meta = dict(sd.metadata, **{"diff2flow.tiny.unet": f"random: UNetModel(cfg) after torch.manual_seed({seed})",
                                    "diff2flow.results.prior_sha256": prior_stamp()})
        save_sd_checkpoint(path, UNetModel(sd.unet.cfg), sd.vae, empty_context=sd.empty_context(), metadata=meta)
    return path


def final_report(name, args):
    """The run's last 256-scene report (sample.py's protocol), and the step-0 one (the untouched model),
    refused if they were read with other sampling steps than train.py `args` reads them with today."""
    out = os.path.join(RUNS, name)
    reports = [r for r in read_log(out) if r["kind"] == "report"]
    want = resolved_args(args).report_steps
    for r in (reports[0], reports[-1]):
        steps = r.get("steps", 2)        # tables written before their rows said so were read with 2 steps
        if (steps, r.get("ensemble", tasks.REPORT_ENSEMBLE)) != (want, tasks.REPORT_ENSEMBLE):
            raise SystemExit(f"results.py: {out}'s table at step {r['step']} was read with {steps} steps, train.py "
                             f"now reads it with {want} (--report-steps): delete {out} to run it again")
    return reports[0], reports[-1]


def transfer():
    """The demo (python train.py --task depth --lora-rank 64) from the prior and from random weights."""
    random_ckpt = random_unet_checkpoint()
    runs = {f"transfer-{init}-s{seed}": ["--ckpt", ckpt, "--seed", str(seed)]
            for init, ckpt in (("prior", TINY_PRIOR), ("random", random_ckpt)) for seed in TRANSFER_SEEDS}
    # the method as written (white noise, uniform t) instead of the demo's two tiny-prior defaults, one seed
    runs["transfer-aswritten-s0"] = ["--ckpt", TINY_PRIOR, "--seed", "0", "--multires-noise", "0", "--t-density", "uniform"]
    res = {}
    for name, args in runs.items():
        args = ["--task", "depth", "--lora-rank", "64", *args]
        run_once(name, args, None)
        start, end = final_report(name, args)
        res[name] = dict(start=start, end=end)
    trivial = next(r for r in read_log(os.path.join(RUNS, "transfer-prior-s0")) if r["kind"] == "report_trivial")
    res["trivial"] = dict(abs_rel=trivial["abs_rel"], delta1=trivial["delta1"])
    save_json(res, "transfer.json")
    return res


class PixelRegressor(nn.Module):
    """A small U-Net on pixels (no prior, no autoencoder) for E[normalised depth | image]: what a plain
    regressor reads from these images, the bar any one-step depth prediction works under."""

    def __init__(self, ch=16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())
        self.down = nn.ModuleList([block(3, ch), block(ch, 2 * ch), block(2 * ch, 4 * ch), block(4 * ch, 4 * ch)])
        self.up = nn.ModuleList([block(8 * ch, 2 * ch), block(4 * ch, ch), block(2 * ch, ch)])
        self.out = nn.Conv2d(ch, 1, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.avg_pool2d(x, 2) if i else x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([skip, F.interpolate(x, scale_factor=2)], 1))
        return self.out(x).clamp(-1, 1)


def ceiling(steps=2000, batch=32, train_scenes=train.TINY_TRAIN_SCENES, heldout=256, marks=(375, 750, 1000, 1500)):
    """The demo's training and held-out scenes, read by PixelRegressor trained with plain MSE, 3 seeds; scored in
    the demo's final-table protocol after `marks` steps and at the end: 12,000 / 24,000 / 32,000 (the demo's:
    2,000 steps of batch 16) / 48,000 / 64,000 samples."""
    import data
    import depth_eval
    from tqdm.auto import tqdm
    done = load_json("ceiling.json", scenes_stamp)
    if done is not None and (done["steps"], done["batch"], done["train_scenes"]) == (steps, batch, train_scenes):
        return done              # 30 minutes, and nothing in it depends on the prior
    hw = prior_hw()
    train_set = data.RenderedDepthDataset.split("train", train_scenes, *hw)
    items = [train_set[i] for i in range(train_scenes)]
    rgb = torch.stack([it["rgb"] for it in items])
    valid = torch.stack([it["valid"] for it in items])
    depth = data.normalize_depth(torch.stack([it["depth"] for it in items]), valid)[0]    # log, as the demo trains
    held = data.RenderedDepthDataset.split("heldout", heldout, *hw)
    res = {}
    for seed in TRANSFER_SEEDS:
        torch.manual_seed(seed)
        net = PixelRegressor()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
        curve = []
        for step in tqdm(range(1, steps + 1), desc=f"ceiling seed {seed}", mininterval=10):
            idx = torch.randint(0, train_scenes, (batch,))
            x, y, m = rgb[idx], depth[idx], valid[idx]
            if torch.rand(()) < 0.5:   # mirror images are scenes too
                x, y, m = x.flip(-1), y.flip(-1), m.flip(-1)
            loss = ((net(x) - y) ** 2 * m).sum() / m.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in marks or step == steps:
                with torch.no_grad():
                    curve.append(dict(step=step, samples=step * batch,
                                      **depth_eval.evaluate(net.eval(), held, space="log", desc="ceiling")))
                net.train()
        res[f"seed{seed}"] = curve
    mean_map = data.mean_normalized_depth(train_set, n=500)    # as tasks.DepthTask.trivial
    res["trivial"] = depth_eval.evaluate(lambda x: mean_map.expand(x.shape[0], -1, -1, -1), held, space="log")
    res.update(steps=steps, batch=batch, train_scenes=train_scenes)
    save_json(res, "ceiling.json", scenes_stamp)
    return res


# ---------------------------------------------------------------------------------------------------
# 3. Depth under limited capacity

def depth_runs(steps):
    """name → train.py arguments. Equal steps everywhere; validation 4 times a run."""
    common = ["--task", "depth", "--steps", str(steps), "--val-every", str(max(1, steps // 4)), "--save-every", str(steps),
              "--batch-size", "8", "--train-scenes", "800", "--val-steps", "4",
              "--multires-noise", "0", "--t-density", "uniform",   # the method as written (not the demo's defaults)
              "--report-scenes", "0"]      # validation is the measure here; the 256-scene report would add 40 min
    runs = {}
    for obj in OBJECTIVE_NAMES:
        for seed in LORA_SEEDS:
            runs[f"lora4-{obj}-s{seed}"] = ["--objective", obj, "--lora-rank", "4", "--seed", str(seed), *common]
        runs[f"full-{obj}-s0"] = ["--objective", obj, "--lora-rank", "0", "--seed", "0", *common]
    # transfer under limited capacity: the same LoRA on a frozen UNet that learned nothing
    random_ckpt = random_unet_checkpoint()
    for seed in LORA_SEEDS:
        runs[f"random-lora4-diff2flow-s{seed}"] = ["--ckpt", random_ckpt, "--objective", "diff2flow", "--lora-rank", "4",
                                                   "--seed", str(seed), *common]
    for name, extra in ABLATION.items():
        runs["ablation-" + name.split()[-1].replace("τ", "tau")] = ["--objective", "diffusion", "--lora-rank", "4",
                                                                   "--seed", "0", *extra, *common]
    return runs


def read_log(run):
    path = os.path.join(run, train.LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


# train.py settings that say where or how a run went, not what it learnt: a run that differs only in these is reused
WHERE_NOT_WHAT = ("out", "resume", "device", "compile", "workers", "cache_dir", "no_cache", "grad_checkpointing",
                  "save_every")


def resolved_args(args):
    """train.py's settings for `args`, its current defaults filled in (results.py runs on the tiny prior only)."""
    now = train.parse_args(args)
    train.apply_defaults(now, {"tiny": True}, 1, lambda *a, **k: None)
    return now


def changed_settings(out, args):
    """(flag, the run's, now's) for each setting in which the run in `out` differs from `train.py args` today,
    with train.py's current defaults filled in (as train.py saved them in its checkpoint): a run made
    before a default changed is then not taken for one of today's. Paths compare by file name, since
    results/runs/ may have been moved; which prior they name is check_prior's job."""
    ckpt = train.latest_checkpoint(out)
    if ckpt is None:
        return []
    saved = torch.load(os.path.join(ckpt, train.STATE_FILE), map_location="cpu", weights_only=True).get("args", {})
    now = resolved_args(args)
    saved["ckpt"], now.ckpt = saved.get("ckpt") or TINY_PRIOR, now.ckpt or TINY_PRIOR   # no --ckpt: the tiny prior here
    same = lambda a, b: a == b or (isinstance(a, str) and isinstance(b, str) and os.path.basename(a) == os.path.basename(b))
    unused = () if now.task == "depth" else ("train_scenes",)   # filled in for every task, read by depth only
    return [("--" + k.replace("_", "-"), saved[k], v) for k, v in sorted(vars(now).items())
            if k not in WHERE_NOT_WHAT + unused and k in saved and not same(saved[k], v)]


def run_once(name, args, steps):
    """Train one configuration unless it already finished; resume it if it was interrupted. A run folder
    made with other settings (train.py's defaults changed since, say) is refused, not reused."""
    out = os.path.join(RUNS, name)
    changed = changed_settings(out, args)
    if changed:
        flag, theirs, mine = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(c[0] for c in changed[1:])})" if len(changed) > 1 else ""
        raise SystemExit(f"results.py: {out} was trained with {flag} {theirs}, train.py now gives {mine}{more}: "
                         f"delete {out} to train it again with today's settings")
    log = read_log(out)
    if steps is None:   # a run of train.py's default length: finished once its final table is written
        if any(r["kind"] == "report" and r["step"] > 0 for r in log):
            return
    elif any(r["kind"] == "val" and r["step"] == steps for r in log):
        return
    resume = train.latest_checkpoint(out) is not None
    print(f"\n=== {name} ({'resuming' if resume else 'new'}) ===")
    train.main(["--out", out, *args, *(["--resume"] if resume else [])])


def depth(steps):
    runs = depth_runs(steps)
    for name, args in runs.items():
        run_once(name, args, steps)
    logs = {name: read_log(os.path.join(RUNS, name)) for name in runs}
    curves = {name: [(r["step"], r["abs_rel"], r["delta1"]) for r in log if r["kind"] == "val"] for name, log in logs.items()}
    trivial = next(r for r in logs[next(iter(runs))] if r["kind"] == "trivial")
    prior = curves[next(iter(runs))][0]
    res = dict(steps=steps, curves=curves, trivial=dict(abs_rel=trivial["abs_rel"], delta1=trivial["delta1"]),
               prior=dict(abs_rel=prior[1], delta1=prior[2]))
    res["sampler_grid"] = sampler_grid_ablation([os.path.join(RUNS, f"lora4-diffusion-s{s}") for s in LORA_SEEDS[:1]])
    save_json(res, "depth.json")
    plot_depth(res)
    return res


def sampler_grid_ablation(run_dirs):
    """The fifth difference is the sampler's grid: the `diffusion` model sampled by Diff2Flow's Euler."""
    import data
    import sample
    out = {}
    for run in run_dirs:
        m = sample.load_run(run, TINY_PRIOR)
        heldout = data.RenderedDepthDataset.split("heldout", tasks.VAL_SCENES, *prior_hw())
        out[os.path.basename(run)] = sample.evaluate_heldout(m.unet, m.vae, m.d2f, m.context, heldout, "diff2flow", 4)
    return out


def plot_depth(res):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind, title in ((axes[0], "lora4", "LoRA rank 4 (3 seeds: mean, min-max)"), (axes[1], "full", "full finetuning")):
        for obj in OBJECTIVE_NAMES:
            runs = [c for n, c in res["curves"].items() if n.startswith(f"{kind}-{obj}-")]
            steps = [s for s, _, _ in runs[0]]
            vals = np.array([[a for _, a, _ in c] for c in runs])
            ax.plot(steps, vals.mean(0), "o-", color=COLORS[obj], label=obj)
            if len(runs) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS[obj], alpha=0.2)
        ax.axhline(res["trivial"]["abs_rel"], color="gray", ls="--", label="mean training depth map")
        ax.set_title(title)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out AbsRel ↓ (4 steps)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "depth.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# 4. A shifted distribution: FD against steps (Fig. 5)

SHIFT_TRAIN, SHIFT_EVAL, SHIFT_SAMPLES, SHIFT_SAMPLE_STEPS = 2000, 1024, 512, 20
SHIFT_SEED0 = 500_000      # scenes the prior never saw (it trained on seeds 0..19,999)


def dusk(rgb):
    """The shifted light: warmer and darker, on [-1, 1] images (a fixed colour map, so a model must
    change every colour it makes, while the geometry stays that of the prior's scenes)."""
    x = (rgb + 1) / 2
    x = x ** 1.4 * torch.tensor([1.0, 0.72, 0.5], dtype=x.dtype).view(3, 1, 1) + torch.tensor([0.06, 0.02, 0.0]).view(3, 1, 1)
    return (x.clamp(0, 1) * 2 - 1)


def dusk_images(seed0, n):
    """Rendered scenes seed0 .. seed0 + n - 1 at the prior's size, under the dusk light: (n, 3, H, W)."""
    import data
    ds = data.RenderedDepthDataset(seed0, n, *prior_hw(), cache=False)
    return torch.stack([dusk(ds[i]["rgb"]) for i in range(n)])


def write_dusk_folder(folder, n):
    """n unseen dusk scenes as a caption folder (PNG + empty caption): what train.py --task t2i reads."""
    import data
    if not os.path.exists(os.path.join(folder, "done")):
        os.makedirs(folder, exist_ok=True)
        for i, rgb in enumerate(dusk_images(SHIFT_SEED0, n)):
            data.save_image(os.path.join(folder, f"{i:05d}.png"), ((rgb.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
            open(os.path.join(folder, f"{i:05d}.txt"), "w").close()
        open(os.path.join(folder, "done"), "w").close()
    return folder


@torch.no_grad()
def sample_features(net, loaded, objective):
    """fd.py features of SHIFT_SAMPLES samples (fixed noise, each objective's own sampler), and the images."""
    import fd
    import sample
    noise = torch.randn(SHIFT_SAMPLES, 4, *prior_hw(latent=True), generator=torch.Generator().manual_seed(777))
    ctx = loaded.context.expand(SHIFT_SAMPLES, -1, -1)
    lat = sample.generate(loaded.unet, loaded.d2f, ctx, noise, SHIFT_SAMPLE_STEPS, objective, batch=128)
    images = sample.decode(loaded.vae, lat, batch=128)
    return fd.image_features(net, images), images


def shift(steps):
    """LoRA rank 4 towards dusk scenes, each objective, 3 seeds; FD to held-out dusk scenes at 0, 1/8, 1/4,
    1/2 and all of `steps`. Step 0 is the prior read through each objective's own sampler."""
    import data
    import fd
    import sample
    from diff2flow import Diff2Flow
    net = fd.load_features()
    folder = write_dusk_folder(os.path.join(OUT, "dusk"), SHIFT_TRAIN)
    held = dusk_images(data.HELDOUT_SEED0, SHIFT_EVAL)
    target = fd.image_features(net, held)
    # the floor: dusk training scenes, as many as the samples, against the same held-out ones
    floor = fd.fd_between(fd.image_features(net, dusk_images(SHIFT_SEED0, SHIFT_SAMPLES)), target)
    res = dict(steps=steps, curves={}, floor=floor)
    prior = sample.load_run(None, TINY_PRIOR)
    feats, _ = sample_features(net, prior, "diffusion")
    res["prior_to_dusk"] = fd.fd_between(feats, target)
    rows = [held[:8]]
    marks = [steps // 8, steps // 4, steps // 2, steps]
    for obj in OBJECTIVE_NAMES:
        # step 0: the untouched prior on the maps its runs use (train.py: zero-SNR end for diff2flow on v-models)
        maps = Diff2Flow(prior.d2f.prediction, obj == "diff2flow" and prior.d2f.prediction == "v")
        untouched = sample.Loaded(prior.unet, prior.vae, None, maps, prior.context, obj, prior.meta)
        f0, images0 = sample_features(net, untouched, obj)
        for seed in LORA_SEEDS:
            name = f"shift-{obj}-s{seed}"
            curve = load_json(f"{name}.json") or [[0, fd.fd_between(f0, target)]]
            for k in marks:
                if any(s == k for s, _ in curve):
                    continue
                resume = train.latest_checkpoint(os.path.join(RUNS, name)) is not None
                train.main(["--out", os.path.join(RUNS, name), "--task", "t2i", "--data", folder, "--objective", obj,
                            "--lora-rank", "4", "--seed", str(seed), "--steps", str(steps), "--stop-at", str(k),
                            "--save-every", str(steps), "--val-every", str(steps), *(["--resume"] if resume else [])])
                feats, images = sample_features(net, sample.load_run(os.path.join(RUNS, name), TINY_PRIOR), obj)
                curve.append([k, fd.fd_between(feats, target)])
                print(f"{name} step {k}: FD to dusk {curve[-1][1]:.3f}")
                save_json(curve, f"{name}.json")
            res["curves"][name] = curve
        _, images = sample_features(net, sample.load_run(os.path.join(RUNS, f"shift-{obj}-s0"), TINY_PRIOR), obj)
        rows += [images0[:8], images[:8]]
    save_grid(os.path.join(OUT, "shift_samples.png"), rows)
    save_json(res, "shift.json")
    plot_shift(res)
    return res


def save_grid(path, rows):
    """Rows of (3, h, w) images in [-1, 1] as one PNG."""
    from sample import save_png
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    save_png(path, ((grid.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))


def plot_shift(res):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for obj in OBJECTIVE_NAMES:
        curves = np.array([res["curves"][f"shift-{obj}-s{s}"] for s in LORA_SEEDS])   # (seeds, points, 2)
        steps, vals = curves[0, :, 0], curves[:, :, 1]
        ax.plot(steps, vals.mean(0), "o-", color=COLORS[obj], label=obj)
        ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS[obj], alpha=0.2)
    ax.axhline(res["floor"], color="gray", ls="--", label="dusk training scenes (floor)")
    ax.set_yscale("log")
    ax.set_xlabel("LoRA finetuning steps")
    ax.set_ylabel("FD to held-out dusk scenes ↓")
    ax.set_title("towards a shifted distribution (3 seeds: mean, min-max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "shift.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# 5. Reflow

REFLOW_PAIRS, REFLOW_MANY = 512, 40


def reflow(steps):
    """Pairs from the prior's own Diff2Flow ODE (40 Euler steps), 1-reflow on them, and the 2-step
    result before and after, on noise the reflow never saw."""
    import sample
    folder, run = os.path.join(OUT, "pairs"), os.path.join(RUNS, "reflow")
    prior = sample.load_run(None, TINY_PRIOR)
    sample.save_pairs(prior, folder, [""], REFLOW_PAIRS, steps=REFLOW_MANY, cfg=1.0, shard_size=64, latent_hw=prior_hw(latent=True))
    run_once("reflow", ["--task", "reflow", "--pairs", folder, "--lora-rank", "0", "--lr", "1e-4", "--steps", str(steps),
                        "--val-steps", "2", "--save-every", str(steps), "--batch-size", "16"], steps)
    after = sample.load_run(run, TINY_PRIOR)
    noise = torch.randn(64, 4, *prior_hw(latent=True), generator=torch.Generator().manual_seed(123456))   # held out
    ctx = prior.context.expand(64, -1, -1)
    res = {}
    for name, m in (("before", prior), ("after", after)):
        res[name] = sample.straightness(m.unet, m.vae, m.d2f, ctx, noise, "diff2flow",
                                        few=2, many=REFLOW_MANY, preview=os.path.join(OUT, f"reflow_{name}.png"))
        print(f"reflow {name}: 2-step vs {REFLOW_MANY}-step distance {res[name]['distance']:.4f}, spread "
              f"{res[name]['spread']:.3f} ({REFLOW_MANY}-step {res[name]['spread_many']:.3f})")
    save_json(res, "reflow.json")
    return res


# ---------------------------------------------------------------------------------------------------

def markdown(alignment_rows=None, transfer_res=None, ceiling_res=None, depth_res=None, shift_res=None, reflow_res=None):
    lines = []
    pm = lambda a: f"{np.mean(a):.3f} ± {np.std(a):.3f}"   # mean ± std over seeds
    if alignment_rows:
        lines += ["| steps | Diff2Flow Euler | Diff2Flow Euler, zero-SNR | naive FM | DDIM from other noise |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['d2f']:.4f} | {r['d2f_zero_snr']:.4f} | {r['naive_fm']:.4f} | {r['unrelated']:.4f} |"
                  for r in alignment_rows]
        lines.append("")
    if transfer_res:
        lines += ["| demo finetuning (3 seeds) from | AbsRel ↓ before | δ1 ↑ before | AbsRel ↓ after | δ1 ↑ after |",
                  "|---|---|---|---|---|"]
        for init, label in (("prior", "the tiny prior"), ("random", "random weights, same architecture")):
            runs = [v for k, v in transfer_res.items() if k.startswith(f"transfer-{init}-")]
            cols = [pm([r[when][m] for r in runs]) for when in ("start", "end") for m in ("abs_rel", "delta1")]
            lines.append(f"| {label} | " + " | ".join(cols) + " |")
        r = transfer_res["transfer-aswritten-s0"]
        lines.append(f"| the tiny prior, white noise and uniform t (seed 0) | {r['start']['abs_rel']:.3f} | {r['start']['delta1']:.3f} "
                     f"| {r['end']['abs_rel']:.3f} | {r['end']['delta1']:.3f} |")
        t = transfer_res["trivial"]
        lines += [f"| mean training depth map | | | {t['abs_rel']:.3f} | {t['delta1']:.3f} |", ""]
    if ceiling_res:
        curves = [ceiling_res[f"seed{s}"] for s in TRANSFER_SEEDS]
        t = ceiling_res["trivial"]
        lines += ["| read from pixels, no prior (3 seeds) | training samples | AbsRel ↓ | δ1 ↑ |", "|---|---|---|---|"]
        for j, mark in enumerate(curves[0]):
            lines.append(f"| plain regressor, step {mark['step']} of batch {ceiling_res['batch']} | {mark['samples']:,} | "
                         f"{pm([c[j]['abs_rel'] for c in curves])} | {pm([c[j]['delta1'] for c in curves])} |")
        lines += [f"| mean training depth map | | {t['abs_rel']:.3f} | {t['delta1']:.3f} |",
                  f"| the demo's bar (15% under the mean map, +0.05 δ1) | | {0.85 * t['abs_rel']:.3f} | {t['delta1'] + 0.05:.3f} |", ""]
    if shift_res:
        marks = [k for k, _ in shift_res["curves"][f"shift-diffusion-s{LORA_SEEDS[0]}"]]
        lines += ["| objective | " + " | ".join(f"FD at step {k}" for k in marks) + " |", "|---" * (len(marks) + 1) + "|"]
        for obj in OBJECTIVE_NAMES:
            vals = np.array([[v for _, v in shift_res["curves"][f"shift-{obj}-s{s}"]] for s in LORA_SEEDS])
            lines.append(f"| {obj} | " + " | ".join(pm(vals[:, j]) for j in range(len(marks))) + " |")
        lines += [f"| dusk training scenes (floor) | {shift_res['floor']:.3f} |", ""]
    if depth_res:
        def final(name):
            c = depth_res["curves"][name]
            return c[-1][1], c[-1][2]

        lines += ["| model | AbsRel ↓ | δ1 ↑ |", "|---|---|---|",
                  f"| untouched prior | {depth_res['prior']['abs_rel']:.3f} | {depth_res['prior']['delta1']:.3f} |",
                  f"| mean training depth map | {depth_res['trivial']['abs_rel']:.3f} | {depth_res['trivial']['delta1']:.3f} |"]
        for kind, label in (("lora4", "LoRA rank 4"), ("full", "full")):
            for obj in OBJECTIVE_NAMES:
                names = [n for n in depth_res["curves"] if n.startswith(f"{kind}-{obj}-")]
                a = np.array([final(n) for n in names])
                spread = f" ± {a[:, 0].std():.3f}" if len(names) > 1 else ""
                spread_d = f" ± {a[:, 1].std():.3f}" if len(names) > 1 else ""
                lines.append(f"| {label}, {obj} | {a[:, 0].mean():.3f}{spread} | {a[:, 1].mean():.3f}{spread_d} |")
        names = [n for n in depth_res["curves"] if n.startswith("random-lora4-diff2flow-")]
        if names:
            a = np.array([final(n) for n in names])
            lines.append(f"| LoRA rank 4, diff2flow, on the same UNet with random weights | {pm(a[:, 0])} | {pm(a[:, 1])} |")
        for name in ABLATION:
            key = "ablation-" + name.split()[-1].replace("τ", "tau")
            a, d = final(key)
            lines.append(f"| LoRA rank 4, diffusion {name} | {a:.3f} | {d:.3f} |")
        for run, s in depth_res.get("sampler_grid", {}).items():
            lines.append(f"| LoRA rank 4, diffusion + Euler on the mapped grid ({run}) | {s['abs_rel']:.3f} | {s['delta1']:.3f} |")
        lines.append("")
    if reflow_res:
        lines += [f"| 2 Euler steps | distance to the {REFLOW_MANY}-step sample ↓ | sample spread | {REFLOW_MANY}-step spread |", "|---|---|---|---|"]
        for k in ("before", "after"):
            r = reflow_res[k]
            lines.append(f"| {k} reflow | {r['distance']:.4f} | {r['spread']:.4f} | {r['spread_many']:.4f} |")
    return "\n".join(lines) + "\n"


def check_prior():
    """Refuse to mix runs of two priors (run_once skips finished runs by name), and stamp a fresh results/runs.
    The JSONs and the random-weights file carry the stamp themselves and are remade when it differs."""
    path, stamp = os.path.join(RUNS, "PRIOR"), prior_stamp()
    made_with = open(path).read().strip() if os.path.exists(path) else stamp
    if made_with != stamp:
        raise SystemExit(f"results.py: {RUNS}/ holds runs of another tiny prior than {TINY_PRIOR} (sha256 in {path}); "
                         f"delete {RUNS}/ to start over")
    os.makedirs(RUNS, exist_ok=True)
    with open(path, "w") as f:
        f.write(stamp + "\n")


PARTS = dict(alignment="alignment_rows", transfer="transfer_res", ceiling="ceiling_res", depth="depth_res", shift="shift_res",
             reflow="reflow_res")
STAMPS = dict(ceiling=scenes_stamp)     # parts that never use the prior; the others hold for its weights only


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="all", choices=["all", *PARTS])
    p.add_argument("--steps", default=500, type=int, help="training steps of each depth run")
    p.add_argument("--shift-steps", default=400, type=int, help="training steps of each shift run")
    p.add_argument("--reflow-steps", default=400, type=int, help="training steps of the reflow run")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    check_prior()
    run = dict(alignment=alignment, transfer=transfer, ceiling=ceiling, depth=lambda: depth(args.steps),
               shift=lambda: shift(args.shift_steps), reflow=lambda: reflow(args.reflow_steps))
    for name in PARTS:
        if args.part in ("all", name):
            run[name]()
    # the tables of every part done so far (parts may run in separate processes or sessions)
    found = {key: load_json(f"{name}.json", STAMPS.get(name, prior_stamp)) for name, key in PARTS.items()}
    found = {key: res for key, res in found.items() if res is not None}
    path = os.path.join(OUT, "RESULTS.md")
    with open(path + ".tmp", "w") as f:
        f.write(markdown(**found))
    os.replace(path + ".tmp", path)
    print(markdown(**found))


if __name__ == "__main__":
    main()
