"""
Depth evaluation: Marigold's protocol and metrics, and the paper's Table 2 as DESIGN.md reads it.

Per image, the model's normalised prediction is turned into what is fitted (prediction_to_depth for
Marigold's depth-space fit; the normalised map itself for the log-space fit), resized to the truth's
size, aligned by least squares on valid pixels, clipped to the set's range and scored by depth_metrics;
a set's numbers are the means of the per-image metrics (as Marigold's eval.py). ensemble_align merges
the members of an ensemble, which agree only up to scale and shift.

This file knows data sets and tensors, not models: whatever predicts comes in as a function
predict(rgb (B, 3, H, W)) -> normalised depth (B, 1, H, W) (sample.py's, or a baseline's).
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data

EVAL_SETS = ("nyu", "kitti", "eth3d", "scannet", "diode")
DEFAULT_SPLITS = {s: f"{s}_test.txt" for s in EVAL_SETS}   # DATA_ROOT/<set>/<set>_test.txt

# Marigold's metrics (src/util/metric.py, eval.py's order); formulas in depth_metrics.
METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog")

def fit_scale_shift(pred, target, valid):
    """Least squares a, b minimising sum over valid pixels of (a * pred + b - target)^2, in float64
    (closed form of the 2x2 normal equations). Raises if fewer than 2 valid pixels."""
    p = torch.as_tensor(pred).double()[torch.as_tensor(valid)]
    g = torch.as_tensor(target).double()[torch.as_tensor(valid)]
    if p.numel() < 2:
        raise ValueError(f"fit_scale_shift: {p.numel()} valid pixels, need at least 2")
    pm, gm = p.mean(), g.mean()
    var = ((p - pm) ** 2).mean()
    a = ((p - pm) * (g - gm)).mean() / var if var > 0 else torch.zeros((), dtype=torch.float64)
    return float(a), float(gm - a * pm)


def align_prediction(pred, gt, valid, space="log"):
    """Per-image least-squares alignment of a relative prediction to metric ground truth.
    space 'log': fit log g ~ a p + b, return exp(a p + b) (for models of log-normalised depth; the
               official validation aligns in log space too);
    space 'depth': fit g ~ a p + b, return a p + b (Marigold's least squares; give it
               prediction_to_depth's map, the paper's protocol).
    Returns (aligned depth in metres, a, b)."""
    pred, gt = torch.as_tensor(pred).double(), torch.as_tensor(gt).double()
    valid = torch.as_tensor(valid) & (gt > 0)
    if space == "log":
        a, b = fit_scale_shift(pred, gt.clamp(min=1e-12).log(), valid)
        return (a * pred + b).exp(), a, b
    if space == "depth":
        a, b = fit_scale_shift(pred, gt, valid)
        return a * pred + b, a, b
    raise ValueError(f"unknown alignment space {space!r}: use 'log' or 'depth'")


def prediction_to_depth(pred, norm="log"):
    """A model's normalised output x in [-1, 1] (near = -1) -> relative depth in [0, 1] (near = 0), the
    way DepthFM writes it: d = minmax(exp(x)) for a log-normalised model, d = minmax(x) for an affine
    one, minmax(y) = (y - min y) / (max y - min y) over each image (the last two dims).
    Why exp is not depth: x = 2 (ln z - ln lo) / ln(hi / lo) - 1 for true depth z and the image's
    unknown quantiles lo, hi, so exp(x) = C * z^k with k = 2 / ln(hi / lo): a power of depth, which
    Marigold's depth-space fit then maps affinely. min-max is affine, so the fit does not see it: it only
    keeps the map in [0, 1] as DepthFM and Marigold store it. A constant map becomes 0."""
    if norm not in data.NORM_QUANTILES:
        raise ValueError(f"unknown depth normalisation {norm!r}: use 'log' or 'affine'")
    x = torch.as_tensor(pred)
    y = x.double().exp() if norm == "log" else x.double()
    lo, hi = y.amin(dim=(-2, -1), keepdim=True), y.amax(dim=(-2, -1), keepdim=True)
    return ((y - lo) / (hi - lo).clamp(min=1e-12)).to(x.dtype)


def depth_metrics(pred, gt, valid):
    """Marigold's ten metrics of one image, over its n valid pixels (p = prediction, g = truth, metres):
        abs_rel  = mean |p - g| / g
        sq_rel   = mean (p - g)^2 / g                 (Marigold divides by g, not g^2)
        rmse     = sqrt(mean (p - g)^2)               (metres)
        rmse_log = sqrt(mean (ln p - ln g)^2)
        log10    = mean |log10 p - log10 g|
        delta_k  = share of max(p / g, g / p) < 1.25^k, k = 1, 2, 3
        i_rmse   = sqrt(mean (1/p - 1/g)^2)           (inverse depth, 1/m)
        silog    = 100 * sqrt(mean e^2 - (mean e)^2), e = ln p - ln g   (scale-invariant log error, x100)
    All are fractions as Marigold's eval.py prints them (papers print AbsRel and delta in %).
    p must be > 0 on valid pixels: evaluate_depth clips to >= 1e-6 first, as Marigold."""
    pred, gt = torch.as_tensor(pred).double(), torch.as_tensor(gt).double()
    valid = torch.as_tensor(valid).to(gt.device) & (gt > 0)
    if not valid.any():
        raise ValueError("depth_metrics: no valid ground-truth pixels")
    p, g = pred[valid], gt[valid]
    if not (p > 0).all():
        raise ValueError("depth_metrics: the prediction must be > 0 on valid pixels (clip it first, as evaluate_depth does)")
    e = p.log() - g.log()
    ratio = torch.maximum(p / g, g / p)
    delta = {f"delta{k}": float((ratio < 1.25 ** k).double().mean()) for k in (1, 2, 3)}
    return dict(abs_rel=float(((p - g).abs() / g).mean()),
                sq_rel=float(((p - g) ** 2 / g).mean()),
                rmse=float(((p - g) ** 2).mean().sqrt()),
                rmse_log=float((e ** 2).mean().sqrt()),
                log10=float((p.log10() - g.log10()).abs().mean()),
                **delta,
                i_rmse=float(((1 / p - 1 / g) ** 2).mean().sqrt()),
                # mean e^2 - (mean e)^2 is a variance: clamp the float round-off below 0 (a perfect
                # prediction up to scale would give sqrt of -1e-17 = nan)
                silog=float(((e ** 2).mean() - e.mean() ** 2).clamp(min=0).sqrt() * 100))


def evaluate_depth(pred, gt, valid, kind="rendered", space="log"):
    """One image under the Marigold protocol: align on valid pixels, clip to the data set's depth
    range (data.DEPTH_KINDS[kind]; and >= 1e-6), then depth_metrics over valid pixels. pred is what the
    alignment fits, at gt's size: prediction_to_depth(x) for space 'depth' (the paper's protocol; for an
    affine-normalised model x itself gives the same fit), the normalised x for space 'log'; valid should
    already hold the data set's crops (the loaders do that). Returns METRICS plus scale and shift."""
    spec = data.DEPTH_KINDS[kind]
    aligned, a, b = align_prediction(pred, gt, valid, space)
    aligned = aligned.clamp(min=max(spec["min_depth"], 1e-6), max=spec["max_depth"])
    return dict(depth_metrics(aligned, gt, valid), scale=a, shift=b)


def _robust_fit(x, ref, m):
    """x aligned to ref: start from matching medians and median absolute deviations (affine-exact,
    and not thrown by a member's hallucinated object as plain least squares is), then least squares
    twice on the pixels whose residual is within 3x the median residual."""
    xm, rm = x[m], ref[m]
    sx, sr = (xm - xm.median()).abs().median(), (rm - rm.median()).abs().median()
    a = sr / sx if sx > 0 else torch.ones((), dtype=x.dtype)
    b = rm.median() - a * xm.median()
    for _ in range(2):
        r = (a * x + b - ref).abs()
        keep = m & (r <= 3 * r[m].median() + 1e-12)
        if keep.sum() < 2:
            break
        a, b = fit_scale_shift(x, ref, keep)
    return a * x + b


def ensemble_align(preds, valid=None, reduction="median", iters=10, tol=1e-7):
    """Merge K predictions of one image that agree only up to scale and shift (in the space the model
    predicts, e.g. normalised log depth). Alternates: fit each member to the current merged map by
    least squares (robustly, see _robust_fit), re-merge by the per-pixel median (or mean), and fix
    the free affine gauge so the merged map keeps the members' average mean and spread. If the
    members are exact affine copies, one step suffices: each member's span {x_k, 1} is the same, so
    all project onto one map.
    preds: (K, H, W) or (K, 1, H, W); valid: optional (H, W) mask of pixels to fit on.
    Returns (merged (H, W) or (1, H, W) as given, spread = median |aligned_k - merged| per pixel)."""
    if reduction not in ("median", "mean"):
        raise ValueError(f"unknown ensemble reduction {reduction!r}: use 'median' or 'mean'")
    x = torch.as_tensor(preds).double()
    shape = x.shape[1:]
    x = x.reshape(x.shape[0], -1)  # (K, N)
    m = torch.ones(x.shape[1], dtype=torch.bool) if valid is None else torch.as_tensor(valid).reshape(-1).bool()
    if m.sum() < 2:
        raise ValueError("ensemble_align: fewer than 2 pixels to align on")
    merge = (lambda y: y.median(0).values) if reduction == "median" else (lambda y: y.mean(0))
    mu, sd = x[:, m].mean(1).mean(), x[:, m].std(1).mean()  # the gauge: members' average statistics
    ref = merge(x)
    aligned = x
    for _ in range(iters):
        aligned = torch.stack([_robust_fit(x[k], ref, m) for k in range(len(x))])
        new = merge(aligned)
        s = new[m].std()
        g_a = sd / s if s > 0 else 1.0
        g_b = mu - g_a * new[m].mean()
        new, aligned = g_a * new + g_b, g_a * aligned + g_b
        done = (new - ref).abs().max() < tol
        ref = new
        if done:
            break
    spread = (aligned - ref).abs().median(0).values
    return ref.reshape(shape).float(), spread.reshape(shape).float()


# ---------------------------------------------------------------------------------------------------
# Protocols, the five sets, the table

# What `--eval` runs. "paper" is Table 2's (§4.3 and appendix A; DESIGN.md "Depth specifics"): every input
# resized to the training resolution (3:4 at the run's long edge: 384×512 for the paper's runs), 10 Euler
# steps, an ensemble of 4, the prediction turned into depth as DepthFM does (exp, min-max) and resized back to
# the truth's size, then Marigold's least squares in depth space. "native" is what `--eval` ran before: the
# aspect ratio kept at the run's long edge, 4 steps, the fit in the space the model predicts (log space for
# log depth, as the official validation). --steps, --ensemble, --align and --eval-res change one setting.
PROTOCOLS = {
    "paper": dict(resize="fixed", align="depth", steps=10, ensemble=4),
    "native": dict(resize="aspect", align=None, steps=4, ensemble=4),
}
# The paper's Table 2 (paper/diff2flow-paper.txt, lines 229-244): (AbsRel, δ1) in %, NFE 10, ensemble 4.
# The paper took the other methods' numbers from E2E-FT [38]; the table's text is complete there.
PAPER_TABLE2 = {
    "Diff2Flow (paper)": dict(nyu=(5.7, 96.7), kitti=(8.7, 92.0), eth3d=(5.5, 97.4), scannet=(6.2, 95.7), diode=(21.6, 79.5)),
    "Diff2Flow LoRA (paper)": dict(nyu=(5.9, 96.4), kitti=(9.5, 90.8), eth3d=(6.0, 96.8), scannet=(6.4, 95.5),
                                   diode=(22.6, 78.5)),
    "Marigold": dict(nyu=(5.5, 96.4), kitti=(9.9, 91.6), eth3d=(6.5, 96.0), scannet=(6.4, 95.1), diode=(30.8, 77.3)),
    "DepthFM": dict(nyu=(6.0, 95.5), kitti=(9.1, 90.2), eth3d=(6.5, 95.4), scannet=(6.6, 94.9), diode=(22.4, 78.5)),
    "E2E FT": dict(nyu=(5.2, 96.6), kitti=(9.6, 91.9), eth3d=(6.2, 95.9), scannet=(5.8, 96.2), diode=(30.2, 77.9)),
}
SET_TITLES = dict(nyu="NYUv2", kitti="KITTI", eth3d="ETH3D", scannet="ScanNet", diode="DIODE")
METRIC_TITLES = dict(abs_rel="AbsRel", sq_rel="SqRel", rmse="RMSE", rmse_log="RMSE-log", log10="log10", delta1="δ1",
                     delta2="δ2", delta3="δ3", i_rmse="i-RMSE", silog="SILog")


def alignment_space(norm, override=None):
    """A log-normalised model predicts log depth up to scale and shift: align in log space; an
    affine-normalised one in depth space (Marigold). `override` forces one, for comparisons."""
    return override or ("log" if norm == "log" else "depth")


def fit_input(pred, space, norm):
    """What the alignment fits: for the depth-space fit the prediction turned into depth as DepthFM does
    (prediction_to_depth: exp and min-max for a log model), for the log-space fit the normalised
    prediction itself (log g ≈ a·x + b)."""
    return prediction_to_depth(pred, norm) if space == "depth" else pred


def resize_to(x, hw):
    """(B, C, h, w) → (B, C, H, W): bilinear with antialiasing, as Marigold resizes inputs and predictions."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)


def evaluate(predict, dataset, kind="rendered", space="log", batch=8, n=None, desc="eval", keys=("abs_rel", "delta1")):
    """Mean metrics (`keys` of METRICS) over a data set, per image: align, clip to the set's range,
    score valid pixels. predict(rgb (B, 3, H, W)) → what the alignment fits (B, 1, H, W) at the input's size."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if n == 0:
        raise ValueError("evaluation data set is empty")
    scores = []
    for i in tqdm(range(0, n, batch), desc=desc, leave=False):
        items = [dataset[j] for j in range(i, min(i + batch, n))]
        pred = predict(torch.stack([it["rgb"] for it in items]))
        for it, p in zip(items, pred):
            scores.append(evaluate_depth(p[0], it["depth"][0], it["valid"][0], kind, space))
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}


def eval_settings(protocol, norm, long_edge, multiple, steps=None, ensemble=None, align=None, eval_res=None, limit=None):
    """The settings one `--eval` runs with: the protocol's, each flag given on top. 'label' names them for
    the output files: the protocol, plus what a flag changed ('paper+steps4'), plus '+limitN'.
    size: the fixed processing size (H, W), 3:4 at the run's long edge unless eval_res 'HxW' gives it;
    None = aspect ratio kept at long_edge."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown --protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    base = PROTOCOLS[protocol]
    s = dict(protocol=protocol, norm=norm, steps=steps or base["steps"], ensemble=ensemble or base["ensemble"],
             align=align or base["align"] or alignment_space(norm), size=None, long_edge=long_edge, limit=limit)
    changed = [f"{k}{s[k]}" for k in ("steps", "ensemble") if s[k] != base[k]]
    if s["align"] != (base["align"] or alignment_space(norm)):
        changed.append(f"align-{s['align']}")
    if eval_res:
        hw = eval_res.lower().split("x")
        if len(hw) != 2 or not all(v.isdigit() and int(v) > 0 for v in hw):
            raise ValueError(f"--eval-res {eval_res!r}: give HxW, e.g. 384x512")
        s["size"] = (int(hw[0]), int(hw[1]))
        if any(v % multiple for v in s["size"]):
            raise ValueError(f"--eval-res {eval_res}: both sides must be multiples of {multiple} (the model's downsampling)")
        changed.append(f"res{s['size'][0]}x{s['size'][1]}")
    elif base["resize"] == "fixed":   # the training resolution: 3:4 at its long edge, 384×512 for 512
        s["size"] = (max(multiple, round(0.75 * long_edge / multiple) * multiple), long_edge)
    label = "+".join([protocol] + changed + ([f"limit{limit}"] if limit else []))
    fit = ("Marigold's least squares in depth space on DepthFM's exp + min-max of the prediction" if s["align"] == "depth"
           else "least squares in log space (log g ≈ a·x + b, as the official validation)")
    res = f"every input at {s['size'][0]}×{s['size'][1]}" if s["size"] else f"aspect ratio kept at long edge {long_edge}"
    steps_text = f"{s['steps']} Euler step{'s' * (s['steps'] > 1)}"
    quick = f" over the first {limit} images of each set (a quick look, not comparable to the paper)" if limit else ""
    s.update(label=label, text=f"protocol {label}: {res}, {steps_text}, ensemble {s['ensemble']}, prediction resized back "
                               f"to the truth's size, {fit}, clipped to each set's depth range; means of per-image "
                               f"metrics{quick}")
    return s


def eval_datasets(sets, data_root, split=None):
    """Open the data sets to evaluate, all of them before any prediction, so a missing file fails first.
    One set: data_root is its extracted folder, split defaults to <data_root>/<set>_test.txt (DEFAULT_SPLITS).
    Several ('--eval all'): data_root holds one folder per set, named as EVAL_SETS, each with its split file:
    <data_root>/nyu/nyu_test.txt, <data_root>/kitti/kitti_test.txt, ... Returns {set: DepthFileDataset}."""
    several = len(sets) > 1
    if several and split:
        raise ValueError("--split names one set's split file; with --eval all each set's is <data-root>/<set>/<set>_test.txt")
    found, missing = {}, []
    for s in sets:
        root = os.path.join(data_root, s) if several else data_root
        try:
            found[s] = data.DepthFileDataset(s, root, split or os.path.join(root, DEFAULT_SPLITS[s]))
        except FileNotFoundError as e:
            missing.append(f"{s}: {e}")
    if missing:
        layout = f" (--eval all expects <data-root>/<set>/<set>_test.txt for {', '.join(EVAL_SETS)})" if several else ""
        raise FileNotFoundError("; ".join(missing) + layout)
    return found


def score_images(predict, dataset, kind, spaces, norm, n=None, desc=None):
    """Per-image metrics of a data set under each alignment space in `spaces` (the first is the protocol's;
    another costs one fit, not a prediction). predict(rgb (1, 3, H, W)) → the normalised prediction
    (1, 1, h, w) at its processing size; each fitted map is resized back to the truth's (H, W), and the
    truth's depth and valid mask are the file's, never resized. Returns {space: [per-image dicts]}."""
    n = len(dataset) if n is None else min(n, len(dataset))
    per = {s: [] for s in spaces}
    for i in tqdm(range(n), desc=desc, unit="img"):        # the bar shows images per second
        it = dataset[i]
        pred = predict(it["rgb"][None]).float().cpu()
        for s in spaces:
            fit = resize_to(fit_input(pred, s, norm), it["depth"].shape[-2:])[0, 0]
            per[s].append(dict(name=it["name"], **evaluate_depth(fit, it["depth"][0], it["valid"][0], kind, s)))
    return per


def mean_metrics(per_image):
    return {k: float(np.mean([r[k] for r in per_image])) for k in METRICS}


def table2_markdown(results, settings, run):
    """The paper's Table 2 columns (AbsRel, δ1 in %) for ours beside the paper's rows, then all of Marigold's
    metrics for ours. results: {set: {"images": n, "metrics": {space: means}}}."""
    spaces = list(next(iter(results.values()))["metrics"])

    def cells(get):
        return " | ".join(f"{get(s)[0]:.1f} | {get(s)[1]:.1f}" if get(s) else "— | —" for s in EVAL_SETS)

    def ours(space):
        return lambda s: ((results[s]["metrics"][space]["abs_rel"] * 100, results[s]["metrics"][space]["delta1"] * 100)
                          if s in results else None)
    head = " | ".join(f"{SET_TITLES[s]} AbsRel ↓ | {SET_TITLES[s]} δ1 ↑" for s in EVAL_SETS)
    lines = [f"# Depth evaluation of {run}", "", settings["text"] + ".", "",
             "Table 2 columns (AbsRel and δ1 in %):", "", f"| method | {head} |", "|---" + "|---:" * 2 * len(EVAL_SETS) + "|"]
    for i, space in enumerate(spaces):
        name = f"ours ({space}-space fit{', same predictions' if i else ''})"
        lines.append(f"| {'**' + name + '**' if i == 0 else name} | {cells(ours(space))} |")
    for name, row in PAPER_TABLE2.items():
        lines.append(f"| {name} | {cells(row.get)} |")
    lines += ["", "Paper rows: the paper's Table 2 (NFE 10, ensemble 4; the other methods' numbers as the paper took "
                  "them from E2E-FT). Compare ours with them only under protocol paper on the full sets.", "",
              f"All of Marigold's metrics, ours ({spaces[0]}-space fit), as Marigold's eval.py prints them (fractions; "
              f"RMSE in m, i-RMSE in 1/m, SILog ×100):", "",
              "| set | images | " + " | ".join(METRIC_TITLES[k] for k in METRICS) + " |",
              "|---|---:" + "|---:" * len(METRICS) + "|"]
    for s, r in results.items():
        lines.append(f"| {SET_TITLES[s]} | {r['images']} | " + " | ".join(f"{r['metrics'][spaces[0]][k]:.4f}"
                                                                         for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_text_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
