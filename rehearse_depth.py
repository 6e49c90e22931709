"""
Rehearse the paper's depth run at full size before spending GPU hours: SD 2.1 + Hypersim + Virtual
KITTI 2 at 384x512, then Table 2's evaluation on NYUv2.

    python rehearse_depth.py                               # CPU: ~25 minutes on 2 cores, < 24 GB
    python rehearse_depth.py --device cuda --batch-size 32 # a GPU: the same at the paper's batch

Nothing here is a stand-in: a random-weight SD 2.1 single file with every key the released
v2-1_768-ema-pruned.safetensors holds (fp16, EMA scalars and LDM's schedule buffers included), data
folders in the real on-disk layouts at the real resolutions (Hypersim as Marigold preprocesses it,
1024x768, train/ and val/ side by side; Virtual KITTI 2 at 1242x375; NYUv2 at 640x480), written by
data.py's writers from rendered scenes, and the README's own commands run as subprocesses:
  1. train.py --task depth --lora-rank 64 ... (the paper's command), killed with SIGKILL once its first
     checkpoint is on disk; this stage builds the latent cache;
  2. the same command with --resume: it must reuse the cache and finish;
  3. sample.py --eval nyu in the paper's protocol (384x512, 10 Euler steps, ensemble 4) on the run;
  4. the outputs load: the run's LoRA onto the checkpoint, the evaluation's JSON.
What it shrinks, so that a CPU finishes (say so next to any number): 4 + 2 Hypersim, 2 VKITTI items, 3 optimizer
steps of batch 1 x 2 accumulation (the paper: 20k of 32), one held-out item for validation and the
final table, one NYUv2 image. Each stage's wall time and peak resident memory (and, on CUDA, peak GPU
memory from the run's own log) go to <dir>/rehearsal.md.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"hypersim": (768, 1024), "vkitti": (375, 1242), "nyu": (480, 640)}   # (H, W) of the real files


def write_data(root, n_train, n_val, n_vkitti, n_nyu):
    """The three data sets in their real layouts, from rendered scenes at the real resolutions."""
    import data
    from scenes import render_scene
    seeds = iter(range(10_000, 20_000))

    def scenes(n, kind):
        return [render_scene(next(seeds), *SIZES[kind]) for _ in range(n)]
    hypersim = os.path.join(root, "hypersim")
    data.write_depth_set("hypersim", os.path.join(hypersim, "train"), scenes(n_train, "hypersim"), split_name="train")
    data.write_depth_set("hypersim", os.path.join(hypersim, "val"), scenes(n_val, "hypersim"), split_name="val")
    vkitti_split = data.write_depth_set("vkitti", os.path.join(root, "vkitti"), scenes(n_vkitti, "vkitti"), split_name="train")
    nyu_split = data.write_depth_set("nyu", os.path.join(root, "nyuv2"), scenes(n_nyu, "nyu"), split_name="test")
    return os.path.join(hypersim, "train"), os.path.join(root, "vkitti"), vkitti_split, os.path.join(root, "nyuv2"), nyu_split


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.path.join("runs", "rehearsal_depth"), help="everything is written here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", default=1, type=int, help="per step (the paper: 32 = batch x accumulation)")
    p.add_argument("--grad-accum", default=2, type=int)
    p.add_argument("--steps", default=3, type=int)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and data from an earlier rehearsal")
    args = p.parse_args(argv)
    from checkpoint import latest_checkpoint
    from rehearse_t2i import run, write_random_sd_checkpoint

    root = os.path.abspath(args.dir)
    if os.path.isdir(root) and not args.keep:
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "rehearsal.log")
    rows = []

    def stage(name, fn):
        t0 = time.time()
        out = fn()
        rows.append((name, time.time() - t0, None))
        print(f"{name}: {rows[-1][1]:.0f} s", flush=True)
        return out

    ckpt = os.path.join(root, "v2-1_768-ema-pruned.safetensors")
    if not os.path.exists(ckpt):
        stage("write a random SD 2.1 file (fp16, every key)", lambda: write_random_sd_checkpoint(ckpt, "sd2"))
    paths = stage("write Hypersim/VKITTI/NYUv2 folders (real layouts and sizes)",
                  lambda: write_data(os.path.join(root, "data"), 4, 2, 2, 1))
    hypersim, vkitti, vkitti_split, nyu, nyu_split = paths
    run_dir = os.path.join(root, "runs", "depth")
    shutil.rmtree(run_dir, ignore_errors=True)
    command = ["train.py", "--task", "depth", "--lora-rank", "64", "--ckpt", ckpt, "--hypersim", hypersim,
               "--vkitti", vkitti, "--vkitti-split", vkitti_split, "--out", run_dir, "--device", args.device,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
               "--save-every", "1", "--val-every", str(args.steps), "--val-items", "1", "--report-scenes", "1"]

    def first_checkpoint():      # a complete one: killing a half-written one leaves nothing to resume
        return latest_checkpoint(run_dir) is not None

    for name, cmd, kill in (("train: the paper's command, killed after its first checkpoint", command, first_checkpoint),
                            ("train --resume: to the end", command + ["--resume"], None),
                            ("sample.py --eval nyu (paper protocol: 384x512, 10 steps, ensemble 4; 1 image)",
                             ["sample.py", "--eval", "nyu", "--data-root", nyu, "--split", nyu_split, "--run", run_dir,
                              "--ckpt", ckpt, "--device", args.device, "--limit", "1"], None)):
        sec, peak_gb, killed = run(name, cmd, log, kill_when=kill)
        rows.append((name + (" (killed)" if killed else ""), sec, peak_gb))
        print(f"{rows[-1][0]}: {sec:.0f} s, peak {peak_gb:.1f} GB", flush=True)
        if kill is not None and not killed:
            raise SystemExit(f"the first run ended before it could be killed; see {log}")

    # 4. what was left loads, and says what it is
    sys.path.insert(0, HERE)
    import sample
    loaded = sample.load_run(run_dir, ckpt)
    meta = loaded.meta
    with open(log) as f:
        text = f.read()
    records = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    shares = [r["data_share"] for r in records if r.get("kind") == "train" and "data_share" in r]
    gpu = [r["gpu_peak_gb"] for r in records if "gpu_peak_gb" in r]
    evals = glob.glob(os.path.join(run_dir, "eval_*.json"))
    checks = {
        "the resumed run reused the latent cache": "(reused)" in text,
        "the LoRA loads onto the checkpoint (kohya format, diff2flow metadata)": meta.get("diff2flow.task") == "depth",
        "the evaluation wrote its table": bool(evals),
        "the run ended at the last step": any(r.get("kind") == "report" and r.get("step") == args.steps for r in records),
    }
    lines = ["| stage | wall time | peak resident memory |", "|---|---|---|"]
    lines += [f"| {n} | {s:.0f} s | {'' if g is None else f'{g:.1f} GB'} |" for n, s, g in rows]
    lines += ["", f"data loading share of the training time (log): {max(shares):.1%} at most" if shares else "",
              f"peak GPU memory in training (log): {max(gpu):.1f} GB" if gpu else "", ""] + [f"- [{'x' if ok else ' '}] {what}" for what, ok in checks.items()]
    with open(os.path.join(root, "rehearsal.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(checks.values()):
        raise SystemExit(f"rehearsal failed: see {log}")


if __name__ == "__main__":
    main()
