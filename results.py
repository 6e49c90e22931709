"""
Regenerate the README's results on the bundled tiny prior: the paper's claims in miniature, on a CPU.

    python results.py                  # about 45 minutes on 2 CPU cores; run it again to continue
    python results.py --part depth     # one part: alignment | depth | reflow

Finished runs are kept under results/runs/ and skipped; an interrupted one resumes from its last
checkpoint. Everything lands in results/: one JSON per part, the figures, and RESULTS.md with the
tables the README shows.
  1. alignment: the untouched prior through Diff2Flow's Euler sampler against DDIM on its own trailing
     grid, from the same noise (close), against naive FM (far); with and without the zero-SNR rescale.
  2. depth: LoRA of rank 4 (small against the UNet's 32-64 channels) and full finetuning, equal
     steps, for the three objectives (3 seeds for LoRA), held-out AbsRel/δ1 against training steps
     (the paper's Fig. 8 in miniature), and an ablation: Diff2Flow's changes added to `diffusion` one
     at a time.
  3. reflow: 2-step samples before and after reflow on held-out noise (see sample.py --save-pairs).
"""
import argparse
import json
import os

import numpy as np
import torch

import tasks
import train
from checkpoint import TINY_PRIOR

OUT = "results"
RUNS = os.path.join(OUT, "runs")
LORA_SEEDS = (0, 1, 2)
OBJECTIVE_NAMES = ("diffusion", "fm", "diff2flow")
# Diff2Flow = diffusion + these (DESIGN.md); each added alone to `diffusion` (1 seed each)
ABLATION = {"+ zero-SNR end": ["--zero-snr", "1"], "+ continuous τ": ["--diffusion-changes", "continuous"],
            "+ timestep density": ["--diffusion-changes", "density"], "+ loss weight": ["--diffusion-changes", "weight"]}


def save_json(obj, name):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------
# 1. Step-0 alignment

@torch.no_grad()
def alignment(n=32, step_counts=(4, 10, 50)):
    from checkpoint import load_sd_checkpoint
    from diff2flow import Diff2Flow, conditioned
    from sample import save_png
    from schedule import Schedule, ddim_sample
    sd = load_sd_checkpoint(TINY_PRIOR)
    unet, vae = sd.unet, sd.vae
    model = conditioned(unet, sd.empty_context().expand(n, -1, -1))
    c = unet.cfg.in_channels
    h, w = 96 // 4, 128 // 4
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
    grid = torch.cat([torch.cat(list(images[k][:8]), dim=2) for k in ("ddim", "d2f", "fm")], dim=1)   # (3, 3h, 8w)
    save_png(os.path.join(OUT, "alignment.png"), ((grid.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    save_json(rows, "alignment.json")
    return rows


# ---------------------------------------------------------------------------------------------------
# 2. Depth under limited capacity

def depth_runs(steps):
    """name → train.py arguments. Equal steps everywhere; validation 4 times a run."""
    common = ["--task", "depth", "--steps", str(steps), "--val-every", str(max(1, steps // 4)), "--save-every", str(steps),
              "--train-scenes", "800", "--val-steps", "4",
              "--multires-noise", "0", "--t-density", "uniform",   # the method as written (not the demo's defaults)
              "--report-scenes", "0"]      # validation is the measure here; the 256-scene report would add 40 min
    runs = {}
    for obj in OBJECTIVE_NAMES:
        for seed in LORA_SEEDS:
            runs[f"lora4-{obj}-s{seed}"] = ["--objective", obj, "--lora-rank", "4", "--seed", str(seed), *common]
        runs[f"full-{obj}-s0"] = ["--objective", obj, "--lora-rank", "0", "--seed", "0", *common]
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


def run_once(name, args, steps):
    """Train one configuration unless it already finished; resume it if it was interrupted."""
    out = os.path.join(RUNS, name)
    done = [r for r in read_log(out) if r["kind"] == "val" and r["step"] == steps]
    if done:
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
        heldout = data.RenderedDepthDataset.split("heldout", tasks.VAL_SCENES, 96, 128)
        out[os.path.basename(run)] = sample.evaluate_heldout(m.unet, m.vae, m.d2f, m.context, heldout, "diff2flow", 4)
    return out


def plot_depth(res):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = dict(diffusion="tab:blue", fm="tab:orange", diff2flow="tab:green")
    for ax, kind, title in ((axes[0], "lora4", "LoRA rank 4 (3 seeds: mean, min-max)"), (axes[1], "full", "full finetuning")):
        for obj in OBJECTIVE_NAMES:
            runs = [c for n, c in res["curves"].items() if n.startswith(f"{kind}-{obj}-")]
            steps = [s for s, _, _ in runs[0]]
            vals = np.array([[a for _, a, _ in c] for c in runs])
            ax.plot(steps, vals.mean(0), "o-", color=colors[obj], label=obj)
            if len(runs) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=colors[obj], alpha=0.2)
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
# 3. Reflow

REFLOW_PAIRS, REFLOW_MANY = 512, 40


def reflow(steps):
    """Pairs from the prior's own Diff2Flow ODE (40 Euler steps), 1-reflow on them, and the 2-step
    result before and after, on noise the reflow never saw."""
    import sample
    folder, run = os.path.join(OUT, "pairs"), os.path.join(RUNS, "reflow")
    prior = sample.load_run(None, TINY_PRIOR)
    sample.save_pairs(prior, folder, [""], REFLOW_PAIRS, steps=REFLOW_MANY, cfg=1.0, shard_size=64, latent_hw=(24, 32))
    run_once("reflow", ["--task", "reflow", "--pairs", folder, "--lora-rank", "0", "--lr", "1e-4", "--steps", str(steps),
                        "--val-steps", "2", "--save-every", str(steps), "--batch-size", "16"], steps)
    after = sample.load_run(run, TINY_PRIOR)
    noise = torch.randn(64, 4, 24, 32, generator=torch.Generator().manual_seed(123456))   # held out
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

def markdown(alignment_rows=None, depth_res=None, reflow_res=None):
    lines = []
    if alignment_rows:
        lines += ["| steps | Diff2Flow Euler | Diff2Flow Euler, zero-SNR | naive FM | DDIM from other noise |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['d2f']:.4f} | {r['d2f_zero_snr']:.4f} | {r['naive_fm']:.4f} | {r['unrelated']:.4f} |"
                  for r in alignment_rows]
        lines.append("")
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="all", choices=["all", "alignment", "depth", "reflow"])
    p.add_argument("--steps", default=500, type=int, help="training steps of each depth run")
    p.add_argument("--reflow-steps", default=400, type=int, help="training steps of the reflow run")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    found = {}
    if args.part in ("all", "alignment"):
        found["alignment_rows"] = alignment()
    if args.part in ("all", "depth"):
        found["depth_res"] = depth(args.steps)
    if args.part in ("all", "reflow"):
        found["reflow_res"] = reflow(args.reflow_steps)
    with open(os.path.join(OUT, "RESULTS.md"), "w") as f:
        f.write(markdown(**found))
    print(markdown(**found))


if __name__ == "__main__":
    main()
