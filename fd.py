"""
fd.py: how good are a tiny model's samples? A Fréchet distance in the features of a small network
that reads rendered scenes, the miniature's stand-in for FID's Inception features.

FID compares the mean and covariance of Inception-v3 features of generated and real images. No
Inception net was trained on our rendered scenes, so we train one that is: SceneNet learns to predict
what each training scene is made of from its image alone: the coarse depth layout (6x8), the coarse
colour layout (3x4 RGB), the coarse detail layout (3x4 gradient energy, so blur shows), and the scene's own parameters (room or open ground, camera height, pitch,
roll, field of view, light, object count). Its 128-d penultimate layer is the feature space, so the
distance sees geometry (floor, walls, horizon, objects) as well as colour. The trained net ships as
assets/tiny_features.safetensors; CI never retrains it.

    python fd.py                       # train it (~5 min on one core), print held-out R^2 and FD floors
    python fd.py --steps 20 --scenes 256 --out runs/smoke/features.safetensors     # smoke test

The distance (Heusel et al. 2017, closed form for two Gaussians):
    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)
A finite sample has a positive floor even against its own distribution: report it next to any FD
(`python fd.py` prints it for two disjoint held-out sets of the size results.py uses).
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from data import HELDOUT_SEED0
from scenes import random_scene

FEATURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_features.safetensors")
FEATURE_DIM = 128
HW = (48, 64)  # the tiny prior's scenes


# ----------------------------------------------------------------------------- the distance

def feature_statistics(feats):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = torch.as_tensor(feats, dtype=torch.float64)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 - μ2‖² + tr(Σ1 + Σ2 - 2(Σ1^½ Σ2 Σ1^½)^½), the Fréchet distance of two Gaussians (FID's formula).
    The matrix square roots come from symmetric eigendecompositions (no scipy needed): Σ1^½ Σ2 Σ1^½ is
    symmetric with the eigenvalues of Σ1 Σ2, so the trace of its root is real and stable."""
    def sqrtm_psd(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    s1h = sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(s1h @ sigma2 @ s1h).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross)


def fd_between(feats_a, feats_b):
    """The Fréchet distance of two feature sets (N, D) and (M, D)."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


def load_feature_extractor(path):
    """A TorchScript feature extractor, e.g. the Inception network clean-fid and StyleGAN's metrics use
    (`inception-2015-12-05.pt`; nothing is downloaded here), for real FID on SD samples.
    Returns f(uint8 (N, 3, H, W)) → (N, D)."""
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
    return fd_between(*[torch.cat([features(x[i:i + batch]) for i in range(0, len(x), batch)]) for x in (images_a, images_b)])


# ----------------------------------------------------------------------------- the feature network

def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class SceneNet(nn.Module):
    """48x64 RGB in [-1, 1] -> 128 features -> the scene's targets. Plain strided convolutions down to
    3x4, flattened (keeping where things are), then one linear layer to the features."""

    def __init__(self, n_targets, width=32):
        super().__init__()
        w = width
        self.body = nn.Sequential(_block(3, w, 2), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2),
                                  _block(4 * w, 4 * w, 2))  # 48x64 -> 3x4
        self.proj = nn.Linear(4 * w * 12, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, n_targets)

    def features(self, x):
        if tuple(x.shape[-2:]) != HW:  # other sizes are compared at the size the net was trained on
            x = F.interpolate(x, size=HW, mode="area")
        return self.proj(self.body(x).flatten(1))

    def forward(self, x):
        return self.head(F.silu(self.features(x)))


def load_features(path=FEATURES, device="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: restore it from git or train it with `python fd.py --out {path}`")
    sd = load_file(path, device=str(device))
    net = SceneNet(sd["head.weight"].shape[0], width=sd["body.0.0.weight"].shape[0]).to(device)
    net.load_state_dict(sd)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def image_features(net, images, batch=256):
    """(N, 3, H, W) images in [-1, 1] (clamped, as decoded samples may overshoot) -> (N, 128)."""
    p = next(net.parameters())
    return torch.cat([net.features(images[i:i + batch].to(p).clamp(-1, 1)) for i in range(0, len(images), batch)])


# ----------------------------------------------------------------------------- what the net learns to predict

def scene_params(seed):
    """The scene's own numbers, from its description (scenes.random_scene): what a viewer would say."""
    s = random_scene(seed)
    rot, pos = s["camera"]["rot"], s["camera"]["pos"]
    n_obj = len(s["spheres"]) + len(s["boxes"]) + len(s["quads"])
    return [float(s["kind"] == "room"), math.log(pos[1]), rot[1, 2],  # camera height; sin(pitch): forward's up part
            rot[1, 0], s["focal_frac"], s["ambient"], s["exposure"],   # roll: how far "right" tilts up
            math.log1p(n_obj), *s["light_color"]]


def scene_targets(rgb8, dnorm, seeds):
    """(N, T) regression targets: coarse normalised depth (invalid = +1, 6x8), coarse colour (3x4x3),
    coarse detail (3x4: mean gradient magnitude, so that blur shows), and scene_params per seed."""
    rgb = rgb8.float() / 127.5 - 1
    depth = F.adaptive_avg_pool2d(dnorm.float(), (6, 8)).flatten(1)
    color = F.adaptive_avg_pool2d(rgb, (3, 4)).flatten(1)
    g = F.pad(rgb.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    grad = (g[..., 2:, 1:-1] - g[..., :-2, 1:-1]).abs() + (g[..., 1:-1, 2:] - g[..., 1:-1, :-2]).abs()  # central: mirror-exact
    detail = F.adaptive_avg_pool2d(grad, (3, 4)).flatten(1)
    params = torch.tensor([scene_params(s) for s in tqdm(seeds, desc="scene params", mininterval=10)])
    return torch.cat([depth, color, detail, params.float()], 1)


TARGET_GROUPS = {"depth layout": slice(0, 48), "colour layout": slice(48, 84), "detail layout": slice(84, 96),
                 "scene parameters": slice(96, None)}
ROLL = 96 + 3   # scene_params' roll entry: the one target a mirror image negates


def mirror_targets(y):
    """The targets of the left-right mirrored images: the layouts flipped, roll negated."""
    depth, color, detail = y[:, :48].view(-1, 6, 8), y[:, 48:84].view(-1, 3, 3, 4), y[:, 84:96].view(-1, 3, 4)
    params = y[:, 96:].clone()
    params[:, ROLL - 96] *= -1
    return torch.cat([depth.flip(-1).flatten(1), color.flip(-1).flatten(1), detail.flip(-1).flatten(1), params], 1)


def r2_by_group(pred, target):
    """Coefficient of determination per target, averaged within each group."""
    r2 = 1 - (pred - target).square().mean(0) / target.var(0, unbiased=False).clamp_min(1e-8)
    return {k: r2[sl].mean().item() for k, sl in TARGET_GROUPS.items()}


# ----------------------------------------------------------------------------- training

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=FEATURES)
    p.add_argument("--work", default="runs/tiny48", help="where tiny.py keeps (or this script puts) the rendered scenes")
    p.add_argument("--scenes", default=20000, type=int, help="training scenes (tiny.py's train split)")
    p.add_argument("--heldout", default=2048, type=int, help="held-out scenes for R^2 and the FD floor")
    p.add_argument("--steps", default=2000, type=int)
    p.add_argument("--batch", default=128, type=int)
    p.add_argument("--lr", default=2e-3, type=float)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--threads", default=1, type=int)
    return p.parse_args(argv)


def main(argv=None):
    from tiny import render_split  # the same cached renders as the prior's (fd.py needs nothing else of tiny.py)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    train, held = render_split("train", args.scenes, HW, args.work), render_split("heldout", args.heldout, HW, args.work)
    y = scene_targets(train["rgb"], train["dnorm"], range(args.scenes))
    y_held = scene_targets(held["rgb"], held["dnorm"], range(HELDOUT_SEED0, HELDOUT_SEED0 + args.heldout))
    mu, sd = y.mean(0), y.std(0).clamp_min(1e-6)  # standardised targets weigh every target alike
    y, y_mirror, y_held = (y - mu) / sd, (mirror_targets(y) - mu) / sd, (y_held - mu) / sd
    x_held = held["rgb"].float() / 127.5 - 1
    torch.manual_seed(args.seed)
    net = SceneNet(y.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.05)
    t0 = time.time()
    for step in (bar := tqdm(range(args.steps), desc="scene net", mininterval=10)):
        for g in opt.param_groups:  # warm-up 100 steps, cosine to 0
            g["lr"] = args.lr * min(1, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        idx = torch.randint(0, args.scenes, (args.batch,))
        x, flip = train["rgb"][idx].float() / 127.5 - 1, torch.rand(args.batch) < 0.5   # mirror half: twice the scenes
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.mse_loss(net(x), torch.where(flip[:, None], y_mirror[idx], y[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    net.eval().requires_grad_(False)
    with torch.no_grad():
        pred = torch.cat([net(x_held[i:i + 256]) for i in range(0, len(x_held), 256)])
    r2 = r2_by_group(pred, y_held)
    feats = image_features(net, x_held)
    half = len(feats) // 2
    floor = fd_between(feats[:half], feats[half:])
    print(f"trained in {time.time() - t0:.0f} s; held-out R^2: " + ", ".join(f"{k} {v:.3f}" for k, v in r2.items()))
    print(f"FD floor, two disjoint held-out sets of {half}: {floor:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp,
              metadata={"r2": str({k: round(v, 4) for k, v in r2.items()}), "fd_floor": f"{floor:.4f}",
                        "fd_floor_n": str(half), "scenes": str(args.scenes), "steps": str(args.steps),
                        "seconds": f"{time.time() - t0:.0f}"})
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
