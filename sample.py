"""
Sample from a finetuned run: depth prediction with an aligned ensemble, and its evaluation.

    python sample.py --steps 2                                # newest run in runs/, held-out rendered scenes
    python sample.py --input photo.jpg --steps 4 --ensemble 4 --out depth_out
    python sample.py --eval nyu --data-root nyuv2/ --split nyu_test.txt   # Marigold protocol, Table 2 columns

Per input image it writes, as Marigold does: `<name>_pred.npy` (float32 in [0, 1], 0 = near; LOG depth
for a log-normalised model, linear for an affine one: the files say which), `<name>_pred.png`
(16-bit, value·65535), `<name>_pred_colored.png` (Spectral colour map, near = warm red, far = blue) and
`<name>_uncertainty.png` (the ensemble's per-pixel spread), each resized back to the input's size.
"""
import argparse
import glob
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

import data
import data_t2i
from checkpoint import find_checkpoint, load_sd_checkpoint
from diff2flow import Diff2Flow, conditioned, multires_noise
from lora import load_lora, merge_lora, read_metadata
from unet import widen_input_conv

RUNS = "runs"
LORA_FILE = "lora.safetensors"
EVAL_SETS = ("nyu", "kitti", "eth3d", "scannet", "diode")
PREVIEW_SAMPLES = 8        # samples in a straightness preview image
DEFAULT_SPLITS = {"nyu": "nyu_test.txt", "kitti": "kitti_test.txt", "eth3d": "eth3d_test.txt",
                  "scannet": "scannet_test.txt", "diode": "diode_test.txt"}
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
    img = vae.encode(rgb)                                      # (B, c, h, w)
    img = img.repeat(ensemble, 1, 1, 1)                        # members of image b at b, b + B, ...
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = multires_noise(img.shape, multires, g).to(img.device, img.dtype)
    model = conditioned(unet, context.expand(img.shape[0], -1, -1), concat=img)
    latent = d2f.sample(model, noise, steps, objective)
    depth = vae.decode(latent).mean(1, keepdim=True).clamp(-1, 1)   # 3 channels back to one
    depth = depth.reshape(ensemble, B, 1, *depth.shape[-2:]).float().cpu()
    if ensemble == 1:
        return depth[0], torch.zeros_like(depth[0])
    merged = [data.ensemble_align(depth[:, b]) for b in range(B)]
    return torch.stack([m for m, _ in merged]).clamp(-1, 1), torch.stack([s for _, s in merged])


def processing_size(h, w, long_edge, multiple):
    """Resize (h, w) so its long edge is `long_edge`, both sides a multiple of `multiple` (the UNet's
    total downsampling in pixels): any aspect ratio works."""
    scale = long_edge / max(h, w)
    return max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple)


def pixel_multiple(unet, vae):
    return 2 ** (len(vae.cfg.ch_mult) - 1) * 2 ** (len(unet.cfg.channel_mult) - 1)


# ---------------------------------------------------------------------------------------------------
# Evaluation on held-out scenes or a data set (Marigold protocol, alignment space by normalisation)

def alignment_space(norm, override=None):
    """A log-normalised model predicts log depth up to scale and shift: align in log space; an
    affine-normalised one in depth space (Marigold). `override` forces one, for comparisons."""
    return override or ("log" if norm == "log" else "depth")


def evaluate(predict, dataset, kind="rendered", space="log", batch=8, n=None, desc="eval"):
    """Mean AbsRel/δ1 over a data set, per image: align, clip to the set's range, score valid pixels.
    predict(rgb (B, 3, H, W)) → normalised prediction (B, 1, H, W) at the input's size."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if n == 0:
        raise ValueError("evaluation data set is empty")
    scores = []
    for i in tqdm(range(0, n, batch), desc=desc, leave=False):
        items = [dataset[j] for j in range(i, min(i + batch, n))]
        pred = predict(torch.stack([it["rgb"] for it in items]))
        for it, p in zip(items, pred):
            scores.append(data.evaluate_depth(p[0], it["depth"][0], it["valid"][0], kind, space))
    return {k: float(np.mean([s[k] for s in scores])) for k in ("abs_rel", "delta1")}


def evaluate_heldout(unet, vae, d2f, context, dataset, objective, steps, norm="log", preview=None, ensemble=1, multires=0.0):
    """Held-out AbsRel/δ1 of the model (train.py's validation), and a preview PNG: input | truth | prediction."""
    device = next(unet.parameters()).device

    def predict(rgb):
        return predict_depth(unet, vae, d2f, context, rgb.to(device), objective, steps, ensemble, multires=multires)[0]

    scores = evaluate(predict, dataset, space=alignment_space(norm), desc="validate")
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


def evaluate_trivial(train_set, heldout, norm="log", n=500):
    """The baseline every depth number must beat: predict the mean normalised training depth map."""
    mean_map = data.mean_normalized_depth(train_set, n, norm)          # (1, H, W)
    return evaluate(lambda rgb: mean_map.expand(rgb.shape[0], -1, -1, -1), heldout,
                    space=alignment_space(norm), desc="trivial")


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
    """The most recently written LoRA of `task` under runs/ (train.py's default output folder)."""
    found = set(glob.glob(os.path.join(root, LORA_FILE)) + glob.glob(os.path.join(root, "**", LORA_FILE), recursive=True))
    found = [f for f in found if read_metadata(f).get("diff2flow.task", task) == task]
    if not found:
        raise FileNotFoundError(f"no trained {task} run under {root}/ (looked for {LORA_FILE}): run "
                                f"`python train.py --task {task}` first, or pass --run")
    return max(found, key=os.path.getmtime)


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


def load_run(run=None, ckpt=None, device="cpu"):
    """Base checkpoint + a run's LoRA (and companion file); run=None gives the untouched prior, sampled
    through Diff2Flow on its own schedule."""
    meta = {}
    if run is not None:
        path = run if run.endswith(".safetensors") else os.path.join(run, LORA_FILE)
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
    for m in (unet, sd.vae, sd.text_encoder):
        if m is not None:
            m.eval().requires_grad_(False).to(device)
    return Loaded(unet, sd.vae, sd.text_encoder, d2f, sd.empty_context().to(device),
                  meta.get("diff2flow.objective", "diff2flow"), meta)


# ---------------------------------------------------------------------------------------------------
# Text-to-image, reflow pairs, and how straight the trajectories are

def sample_noise(shape, seed, indices):
    """Noise for samples `indices`, each from its own seed: sample i is the same whoever draws it, so a
    resumed pair generation or a subset of prompts reproduces exactly."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in indices])


@torch.no_grad()
def generate(unet, d2f, context, noise, steps, objective="diff2flow", uncond=None, cfg=1.0):
    """Latents from noise; CFG on the raw output when uncond is given and cfg != 1."""
    model = conditioned(unet, context, uncond_context=uncond, cfg_scale=cfg)
    return d2f.sample(model, noise, steps, objective)


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
        rows = [torch.cat(list(vae.decode(x[:PREVIEW_SAMPLES]).clamp(-1, 1).cpu()), dim=2) for x in (x_few, x_many)]
        save_png(preview, rgb_to_uint8(torch.cat(rows, dim=1)))
    return res


def save_pairs(loaded, folder, prompts, num, steps=40, cfg=7.5, shard_size=64, seed=0, latent_hw=None):
    """Reflow pairs (noise, latent, caption) from the model's own ODE into shards; resumable: whole shards
    are kept, torn or missing ones (re)generated with the same per-sample noise."""
    if not prompts:
        raise ValueError("no prompts to generate pairs from")
    os.makedirs(folder, exist_ok=True)
    c = loaded.unet.cfg.out_channels
    shape = (c, *latent_hw)
    settings = {"objective": loaded.objective, "steps": steps, "cfg": cfg, "seed": seed,
                "zero_snr": loaded.d2f.zero_snr, "prediction": loaded.d2f.prediction,
                "base": loaded.meta.get("diff2flow.base_checkpoint", "")}
    todo = data_t2i.missing_shards(folder, num, shard_size)
    device = loaded.context.device
    for k in tqdm(todo, desc="pair shards"):
        idx = list(range(k * shard_size, min(num, (k + 1) * shard_size)))
        captions = [prompts[i % len(prompts)] for i in idx]
        noise = sample_noise(shape, seed, idx).to(device)
        uncond = loaded.context.expand(len(idx), -1, -1)
        x1 = generate(loaded.unet, loaded.d2f, loaded.encode(captions), noise, steps, loaded.objective, uncond, cfg)
        # The FM line t·x1 + (1-t)·x0 must pass through the sampler's true start (DESIGN.md: eps-models)
        x0 = loaded.d2f.flow_noise(noise, x1) if loaded.objective == "diff2flow" else noise
        data_t2i.write_shard(os.path.join(folder, data_t2i.SHARD.format(k)), x0, x1, captions, settings)
    return len(todo)


def png_info(prompt, seed, steps, cfg, objective, model):
    """A1111-style "parameters" text (what image browsers read) plus one key per setting."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: {steps}, Sampler: {'DDIM' if objective == 'diffusion' else 'Diff2Flow Euler'}, "
                                f"CFG scale: {cfg}, Seed: {seed}, Model: {model}")
    for k, v in dict(prompt=prompt, seed=seed, steps=steps, cfg=cfg, objective=objective, model=model).items():
        info.add_text(k, str(v))
    return info


# ---------------------------------------------------------------------------------------------------
# Fréchet distance with a pluggable feature extractor

def feature_statistics(feats):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = torch.as_tensor(feats, dtype=torch.float64)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2(Σ1^½ Σ2 Σ1^½)^½), the Fréchet distance of two Gaussians (FID's formula).
    The matrix square roots come from symmetric eigendecompositions (no scipy needed)."""
    def sqrtm_psd(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    s1h = sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(s1h @ sigma2 @ s1h).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross)


def load_feature_extractor(path):
    """A TorchScript feature extractor, e.g. the Inception network clean-fid and StyleGAN's metrics use
    (`inception-2015-12-05.pt`; nothing is downloaded here). Returns f(uint8 (N, 3, H, W)) → (N, D)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"feature extractor not found: {path} (give the TorchScript Inception file)")
    net = torch.jit.load(path, map_location="cpu").eval()

    def features(images):
        with torch.no_grad():
            try:
                return net(images, return_features=True)
            except (RuntimeError, TypeError):
                return net(images)
    return features


def fid(features, images_a, images_b, batch=50):
    """Fréchet distance between two image sets (uint8 (N, 3, H, W)) under a feature extractor."""
    stats = [feature_statistics(torch.cat([features(x[i:i + batch]) for i in range(0, len(x), batch)])) for x in (images_a, images_b)]
    return frechet_distance(*stats[0], *stats[1])


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
            rgb = np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1
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
    p.add_argument("--steps", default=4, type=int, help="Euler steps (DDIM steps for a diffusion-objective run)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num", default=8, type=int, help="depth: held-out scenes when no --input; t2i: images (or pairs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    depth = p.add_argument_group("depth")
    depth.add_argument("--input", default=None, help="image or folder (default: held-out rendered scenes)")
    depth.add_argument("--ensemble", default=4, type=int, help="ensemble members per image")
    depth.add_argument("--processing-res", default=None, type=int, help="long edge to process at (default: the training resolution's)")
    depth.add_argument("--eval", default=None, choices=EVAL_SETS, help="evaluate on a data set (Marigold protocol)")
    depth.add_argument("--data-root", default=None, help="extracted evaluation archive")
    depth.add_argument("--split", default=None, help="split file (default: <data-root>/<set>_test.txt)")
    depth.add_argument("--align", default=None, choices=["log", "depth"], help="force the alignment space (default: by the run's normalisation)")
    t2i = p.add_argument_group("text-to-image and reflow pairs")
    t2i.add_argument("--prompt", default="", help="a prompt, or a text file with one prompt per line")
    t2i.add_argument("--cfg", default=7.5, type=float, help="classifier-free guidance scale")
    t2i.add_argument("--res", default=None, help="HxW of the images (default: the run's, else 96x128 tiny / 512x512 SD)")
    t2i.add_argument("--save-pairs", default=None, help="write --num reflow pairs to this folder (resumable)")
    t2i.add_argument("--shard-size", default=64, type=int)
    args = p.parse_args(argv)
    if args.steps < 1 or args.ensemble < 1 or args.num < 1:
        p.error("--steps, --ensemble and --num must be at least 1")
    return main_depth(args, p) if args.task == "depth" else main_t2i(args)


def main_t2i(args):
    loaded = load_run(args.run, args.ckpt, args.device)
    tiny = loaded.meta.get("diff2flow.family") == "tiny"
    if args.res:
        hw = tuple(int(v) for v in args.res.lower().split("x"))
    else:
        long_edge = int(loaded.meta.get("diff2flow.res_long_edge", 0))
        hw = (long_edge, long_edge) if long_edge else ((96, 128) if tiny else (512, 512))
    factor = 2 ** (len(loaded.vae.cfg.ch_mult) - 1)
    latent_hw = (hw[0] // factor, hw[1] // factor)
    prompts = data_t2i.read_prompts(args.prompt) if args.prompt else [""]
    if loaded.text_encoder is None and any(prompts):
        print("note: this checkpoint has no text encoder (the tiny prior): prompts are ignored")
    if args.save_pairs:
        made = save_pairs(loaded, args.save_pairs, prompts, args.num, args.steps, args.cfg, args.shard_size, args.seed, latent_hw)
        print(f"{args.save_pairs}: {made} shard(s) written, {args.num} pairs in all ({args.steps} "
              f"{'DDIM' if loaded.objective == 'diffusion' else 'Euler'} steps, CFG {args.cfg})")
        return
    out = args.out or os.path.join(args.run if args.run and os.path.isdir(args.run) else "runs", "samples_t2i")
    idx = list(range(args.num))
    captions = [prompts[i % len(prompts)] for i in idx]
    noise = sample_noise((loaded.unet.cfg.out_channels, *latent_hw), args.seed, idx).to(args.device)
    latents = generate(loaded.unet, loaded.d2f, loaded.encode(captions), noise, args.steps, loaded.objective,
                       loaded.context.expand(len(idx), -1, -1), args.cfg)
    images = [rgb_to_uint8(x) for x in loaded.vae.decode(latents).clamp(-1, 1).float().cpu()]
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
    objective, norm = loaded.objective, meta.get("diff2flow.norm", "log")
    space = alignment_space(norm, args.align)
    out = args.out or os.path.join(run if os.path.isdir(run) else os.path.dirname(run), "samples")
    print(f"run {run}: {objective} objective, {meta['diff2flow.prediction_type']}-prediction, {norm} depth; "
          f"{args.steps} {'DDIM' if objective == 'diffusion' else 'Euler'} steps, ensemble {args.ensemble}; "
          f"alignment in {space} space")
    multiple = pixel_multiple(unet, vae)
    long_edge = args.processing_res or int(meta.get("diff2flow.res_long_edge", 128 if "tiny" in meta.get("diff2flow.family", "") else 768))

    def predict(rgb):   # (B, 3, H, W) at any size → (B, 1, H, W) at that size
        size = processing_size(*rgb.shape[-2:], long_edge, multiple)
        x = F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False) if size != tuple(rgb.shape[-2:]) else rgb
        pred, spread = predict_depth(unet, vae, d2f, context, x.to(args.device), objective, args.steps, args.ensemble,
                                     args.seed, multires=float(meta.get("diff2flow.multires_noise", 0)))
        back = lambda t: F.interpolate(t, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return back(pred), back(spread)

    if args.eval:
        if not args.data_root:
            p.error("--eval needs --data-root (the extracted archive)")
        split = args.split or os.path.join(args.data_root, DEFAULT_SPLITS[args.eval])
        dataset = data.DepthFileDataset(args.eval, args.data_root, split)
        scores = evaluate(lambda rgb: predict(rgb)[0], dataset, args.eval, space, batch=1, desc=args.eval)
        print(f"{args.eval} ({len(dataset)} images): AbsRel {scores['abs_rel'] * 100:.1f}  δ1 {scores['delta1'] * 100:.1f}")
        return scores

    if args.input:
        items = [(os.path.splitext(os.path.basename(f))[0], read_image(f), None) for f in list_inputs(args.input)]
    else:
        h, w = (96, 128) if "tiny" in meta.get("diff2flow.family", "") else (384, 512)
        heldout = data.RenderedDepthDataset.split("heldout", args.num, h, w)
        items = [(heldout[i]["name"], heldout[i]["rgb"], heldout[i]) for i in range(len(heldout))]
    scores = []
    for name, rgb, truth in tqdm(items, desc="depth"):
        pred, spread = predict(rgb[None])
        pred01 = ((pred[0, 0].numpy() + 1) / 2).clip(0, 1)
        write_depth_outputs(out, name, pred01, spread[0, 0].numpy(), norm)
        if truth is not None:
            save_png(os.path.join(out, f"{name}_input.png"), rgb_to_uint8(rgb))
            scores.append(data.evaluate_depth(pred[0, 0], truth["depth"][0], truth["valid"][0], "rendered", space))
    print(f"wrote {len(items)} predictions to {out}/ (*_pred.npy in [0, 1] = {'log' if norm == 'log' else 'linear'} "
          f"depth, near = 0; *_pred.png 16-bit; *_pred_colored.png near = red; *_uncertainty.png)")
    if scores:
        print(f"{len(scores)} held-out scenes: AbsRel {np.mean([s['abs_rel'] for s in scores]):.4f}  "
              f"δ1 {np.mean([s['delta1'] for s in scores]):.4f} (too few scenes to compare models: train.py's final "
              f"table uses 256, beside the mean depth map)")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
