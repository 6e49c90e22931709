"""
Depth data for diff2flow: rendered scenes (scenes.py) as a data set, the real data sets' file
layouts, depth normalisation, and the evaluation protocol (least-squares alignment, Marigold's
metrics, ensembling).

Sections, in the order a reader needs them:
  1. RenderedDepthDataset over the procedural scenes of scenes.py
  2. file IO, writers and loaders for the layouts of Hypersim (as Marigold preprocesses it),
     Virtual KITTI 2, and the evaluation archives (NYUv2, KITTI Eigen, ETH3D, ScanNet, DIODE);
     MixedDataset for the ~9:1 Hypersim + Virtual KITTI 2 training mixture
  3. depth normalisation to [-1, 1] (log 1%/99%, affine 2%/98%) and its inverse
(the evaluation protocol and metrics are depth_eval.py's)

Conventions shared by every torch Dataset here: an item is a dict
    rgb   (3, H, W) float32 in [-1, 1]   (the VAE's input range; [0, 1] is rgb * 0.5 + 0.5)
    depth (1, H, W) float32 planar depth in metres, 0 where invalid
    valid (1, H, W) bool, True where depth is usable ground truth
    name  str, the RGB file's path relative to the data set root (or "scene_<seed>")
Planar depth = the z coordinate of the surface point in the camera frame (not the ray length).

Facts checked against Marigold's data set classes, configs and split lists (read, not copied):
| kind     | RGB      | depth file                              | valid range (m)  | crop / eval mask          |
|----------|----------|-----------------------------------------|------------------|---------------------------|
| hypersim | PNG      | uint16 PNG, millimetres, 0 = invalid    | (1e-5, 65)       | none                      |
| vkitti   | JPG      | uint16 PNG, centimetres, sky = 65535    | (1e-5, 80)       | KITTI benchmark crop      |
| nyu      | PNG      | uint16 PNG, millimetres (raw, + filled) | (1e-3, 10)       | Eigen crop [45:471,41:601]|
| kitti    | PNG      | uint16 PNG, value / 256, 0 = invalid    | (1e-5, 80)       | benchmark crop, Eigen mask|
| eth3d    | JPG      | raw float32 (no header), inf = invalid  | (1e-5, inf)      | none                      |
| scannet  | JPG      | uint16 PNG, millimetres                 | (1e-3, 10)       | none                      |
| diode    | PNG      | .npy (H, W, 1) metres + _depth_mask.npy | mask file (*)    | none                      |
(*) DIODE's validity is its mask file; aligned predictions are clipped to [0.6, 350] m.
Ranges are open intervals (d > min and d < max), as Marigold tests them.
"""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scenes import MAX_RENDER_DEPTH, RENDER_MIN_DEPTH, camera_rays, camera_rotation, random_scene, render, render_scene  # noqa: F401

# -----------------------------------------------------------------------------
# 1. Procedural scenes (scenes.py) as a Dataset

TRAIN_SEED0 = 0           # RenderedDepthDataset.split("train", n) uses seeds [0, n)
HELDOUT_SEED0 = 1_000_000  # ... and split("heldout", n) uses [1e6, 1e6 + n): disjoint by construction


def _to_item(rgb01, depth, valid, name):
    """numpy (H, W, 3) [0, 1], (H, W), (H, W) -> the Dataset item dict (see the module docstring)."""
    return dict(rgb=torch.from_numpy(np.ascontiguousarray(rgb01.transpose(2, 0, 1))).float() * 2 - 1,
                depth=torch.from_numpy(np.where(valid, depth, 0).astype(np.float32))[None],
                valid=torch.from_numpy(np.ascontiguousarray(valid))[None], name=name)


class RenderedDepthDataset(torch.utils.data.Dataset):
    """Procedural scenes for seeds [seed0, seed0 + n). RGB is quantised to 8 bits like a photo.
    cache=True keeps rendered items in memory (about 8 bytes a pixel), so each scene renders once
    per process (DataLoader workers keep their own caches)."""

    def __init__(self, seed0, n, height=96, width=128, cache=True):
        if n <= 0:
            raise ValueError(f"RenderedDepthDataset needs n > 0 scenes, got n={n}")
        self.seed0, self.n, self.height, self.width = seed0, n, height, width
        self.cache = {} if cache else None

    @classmethod
    def split(cls, name, n, height=96, width=128, cache=True):
        """'train' -> seeds [0, n); 'heldout' -> seeds [1e6, 1e6 + n): disjoint for any n < 1e6."""
        if name not in ("train", "heldout"):
            raise ValueError(f"unknown rendered split {name!r}: use 'train' or 'heldout'")
        if n > HELDOUT_SEED0:
            raise ValueError(f"at most {HELDOUT_SEED0} scenes per split, got {n}")
        return cls(TRAIN_SEED0 if name == "train" else HELDOUT_SEED0, n, height, width, cache)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} scenes")
        if self.cache is not None and i in self.cache:
            rgb8, depth, valid = self.cache[i]
        else:
            out = render_scene(self.seed0 + i, self.height, self.width)
            rgb8 = np.round(out["rgb"] * 255).astype(np.uint8)
            depth, valid = out["depth"], out["valid"]
            if self.cache is not None:
                self.cache[i] = (rgb8, depth, valid)
        return _to_item(rgb8.astype(np.float32) / 255, depth, valid, f"scene_{self.seed0 + i}")


# -----------------------------------------------------------------------------
# 2. Files: the real data sets' layouts

HYPERSIM_FOCAL = 886.81  # pixels, at Hypersim's 1024 x 768


def distance_to_planar(distance, focal=HYPERSIM_FOCAL):
    """Hypersim stores Euclidean distance from the camera centre (depth_meters.hdf5); planar depth is
    z = distance * f / |(x, y, f)| with (x, y) the pixel centre relative to the image centre:
    x = j + 0.5 - W/2, y = i + 0.5 - H/2. f = 886.81 px holds at 1024 x 768; pass the focal length
    of other sizes (it scales with the width)."""
    distance = np.asarray(distance, np.float64)
    return distance * focal / _ray_length(distance.shape[-2:], focal)


def planar_to_distance(depth, focal=HYPERSIM_FOCAL):
    """Inverse of distance_to_planar."""
    depth = np.asarray(depth, np.float64)
    return depth * _ray_length(depth.shape[-2:], focal) / focal


def _ray_length(hw, focal):
    y, x = np.meshgrid(np.arange(hw[0]) + 0.5 - hw[0] / 2, np.arange(hw[1]) + 0.5 - hw[1] / 2, indexing="ij")
    return np.sqrt(x * x + y * y + focal * focal)  # |(x, y, f)| in pixels


# How each kind stores depth, its valid range (open interval, Marigold's) and its crops.
# eval_crop: the evaluation region; eval_default: whether loaders apply it unasked.
_K = dict(kb_crop=False, eval_crop=None, eval_default=False)
DEPTH_KINDS = {
    "hypersim": dict(_K, encoding="png_mm", min_depth=1e-5, max_depth=65.0),
    "vkitti": dict(_K, encoding="png_cm", min_depth=1e-5, max_depth=80.0, kb_crop=True, eval_crop="kitti_eigen"),
    "nyu": dict(_K, encoding="png_mm", min_depth=1e-3, max_depth=10.0, eval_crop="nyu_eigen", eval_default=True),
    "kitti": dict(_K, encoding="png_256", min_depth=1e-5, max_depth=80.0, kb_crop=True, eval_crop="kitti_eigen",
                  eval_default=True),
    "eth3d": dict(_K, encoding="eth3d_raw", min_depth=1e-5, max_depth=math.inf),
    "scannet": dict(_K, encoding="png_mm", min_depth=1e-3, max_depth=10.0),
    "diode": dict(_K, encoding="npy", min_depth=0.6, max_depth=350.0),
    "rendered": dict(_K, encoding=None, min_depth=RENDER_MIN_DEPTH, max_depth=MAX_RENDER_DEPTH),
}
# The evaluation sets of the paper's Table 2: Marigold's archive names and split lists (in Marigold's
# repository under data_split/), and the image counts after dropping KITTI's lines without depth.
EVAL_SETS = {
    "nyu": dict(archive="nyuv2/nyu_labeled_extracted.tar", split="nyu_depth/labeled/filename_list_test.txt",
                n=654),
    "kitti": dict(archive="kitti/kitti_eigen_split_test.tar", split="kitti_depth/eigen_test_files_with_gt.txt",
                  n=652),
    "eth3d": dict(archive="eth3d/eth3d.tar", split="eth3d_depth/eth3d_filename_list.txt", n=454),
    "scannet": dict(archive="scannet/scannet_val_sampled_800_1.tar",
                    split="scannet_depth/scannet_val_sampled_list_800_1.txt", n=800),
    "diode": dict(archive="diode/diode_val.tar", split="diode_depth/diode_val_all_filename_list.txt", n=771),
}
# File naming of each layout, as in the real archives' split lists; {i} = sample index, {g} = i // 100
# (a scene or drive), {s} = split name. Columns: RGB, depth, then NYU's filled depth or DIODE's mask.
LAYOUTS = {
    "hypersim": ["ai_000_{g:03d}/rgb_cam_00_fr{i:04d}.png", "ai_000_{g:03d}/depth_plane_cam_00_fr{i:04d}.png"],
    "vkitti": ["rgb/Scene{g:02d}/clone/frames/rgb/Camera_0/rgb_{i:05d}.jpg",
               "depth/Scene{g:02d}/clone/frames/depth/Camera_0/depth_{i:05d}.png"],
    "nyu": ["{s}/scene_{g:04d}/rgb_{i:04d}.png", "{s}/scene_{g:04d}/depth_{i:04d}.png",
            "{s}/scene_{g:04d}/filled_{i:04d}.png"],
    "kitti": ["2011_09_26/2011_09_26_drive_{g:04d}_sync/image_02/data/{i:010d}.png",
              "2011_09_26_drive_{g:04d}_sync/proj_depth/groundtruth/image_02/{i:010d}.png"],
    "eth3d": ["rgb/scene{g}/images/dslr_images/DSC_{i:04d}.JPG",
              "depth/scene{g}_dslr_depth/scene{g}/ground_truth_depth/dslr_images/DSC_{i:04d}.JPG"],
    "scannet": ["scene{g:04d}_00/color/{i:06d}.jpg", "scene{g:04d}_00/depth/{i:06d}.png"],
    "diode": ["indoors/scene_{g:05d}/scan_{i:05d}/{g:05d}_{i:05d}_indoors_000_000.png",
              "indoors/scene_{g:05d}/scan_{i:05d}/{g:05d}_{i:05d}_indoors_000_000_depth.npy",
              "indoors/scene_{g:05d}/scan_{i:05d}/{g:05d}_{i:05d}_indoors_000_000_depth_mask.npy"],
}
KB_CROP_HW = (352, 1216)  # the KITTI benchmark crop: bottom 352 rows, centred 1216 columns


def _check_kind(kind):
    if kind not in LAYOUTS:
        raise ValueError(f"unknown data set kind {kind!r}: use one of {', '.join(LAYOUTS)}")


def _atomic(path, write):
    """Write through a temporary name in the same folder, then rename (no half-written files)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_image(path, array, quality=95):
    """uint8 (H, W, 3) or uint16 (H, W) -> PNG/JPG by extension, atomically. uint16 is 16-bit PNG."""
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"save_image: unknown image extension in {path}; use .png or .jpg")
    img = Image.fromarray(np.asarray(array))  # uint16 (H, W) -> mode I;16
    _atomic(path, lambda f: img.save(f, format=fmt, **({"quality": quality} if fmt == "JPEG" else {})))


def _open_image(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file: {path}")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # PIL raises several types for broken files
        raise ValueError(f"cannot read image {path}: {e}") from None
    return img


def read_rgb(path):
    """An RGB image file -> float32 (H, W, 3) in [0, 1]."""
    return rgb01(_open_image(path))


def rgb01(img):
    """A PIL image -> float32 (H, W, 3) in [0, 1]. 16-bit grey PNGs/TIFFs (modes I;16*, I) are scaled by
    65535: PIL's convert("RGB") clips them at 255, which reads a photo as nearly all white. (16-bit RGB
    PNGs PIL opens as 8-bit RGB itself.)"""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img, np.float32) / 65535.0
        return np.repeat(grey.clip(0, 1)[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), np.float32) / 255.0


def read_png16(path):
    """A 16-bit PNG -> float64 (H, W) of the raw integer values."""
    img = _open_image(path)
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel 16-bit depth PNG, got mode {img.mode} "
                         f"shape {arr.shape}")
    return arr.astype(np.float64)


def _read_npy(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return np.load(path).astype(np.float64).squeeze()
    except Exception as e:
        raise ValueError(f"cannot read numpy file {path}: {e}") from None


def read_depth_file(kind, path, hw):
    """A depth file of `kind` -> float64 (H, W) metres, 0 where the file holds no measurement.
    hw = (H, W) of the RGB image: ETH3D's raw files do not store their size (6048 x 4032 in the real
    set). DIODE's validity is in a separate mask file (see DepthFileDataset)."""
    enc = DEPTH_KINDS[kind]["encoding"]
    if enc == "png_mm":
        return read_png16(path) / 1000.0
    if enc == "png_cm":
        return read_png16(path) / 100.0  # sky = 65535 -> 655.35 m, outside the valid range
    if enc == "png_256":
        return read_png16(path) / 256.0
    if enc == "npy":
        return _read_npy(path)
    # eth3d: raw little-endian float32, row-major, no header; inf = no measurement
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file: {path}")
    raw = np.fromfile(path, dtype="<f4")
    if raw.size != hw[0] * hw[1]:
        raise ValueError(f"{path}: {raw.size} float32 values, but its RGB image is {hw[1]}x{hw[0]} "
                         f"({hw[0] * hw[1]} pixels)")
    d = raw.reshape(hw).astype(np.float64)
    return np.where(np.isfinite(d), d, 0.0)


def write_depth_file(kind, path, depth, valid):
    """Inverse of read_depth_file, atomically. PNG encodings round to the nearest step (Marigold's
    Hypersim preprocessing truncates; rounding halves the error); depths that do not fit in uint16
    are written as invalid: Hypersim mm >= 65.535 m -> 0, Virtual KITTI cm: invalid -> 65535 (sky)."""
    depth, valid = np.asarray(depth, np.float64), np.asarray(valid, bool)
    enc = DEPTH_KINDS[kind]["encoding"]
    if enc in ("png_mm", "png_cm", "png_256"):
        per_metre = {"png_mm": 1000, "png_cm": 100, "png_256": 256}[enc]
        q = np.round(depth * per_metre)
        ok = valid & (q > 0) & (q < 65535)
        save_image(path, np.where(ok, q, 65535 if enc == "png_cm" else 0).astype(np.uint16))
    elif enc == "npy":  # DIODE: (H, W, 1) float32 metres
        d = np.where(valid, depth, 0).astype(np.float32)[..., None]
        _atomic(path, lambda f: np.save(f, d))
    else:
        raw = np.where(valid, depth, np.inf).astype("<f4")
        _atomic(path, lambda f: f.write(raw.tobytes()))


def kitti_benchmark_crop(x):
    """The bottom 352 rows and the centred 1216 columns of an (..., H, W) array or tensor."""
    h, w = x.shape[-2:]
    ch, cw = KB_CROP_HW
    if h < ch or w < cw:
        raise ValueError(f"image {h}x{w} is smaller than the KITTI benchmark crop {ch}x{cw}; "
                         f"pass kb_crop=False for smaller images")
    top, left = h - ch, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def eval_crop_mask(name, height, width):
    """The evaluation region (H, W) bool of a data set: NYU's Eigen crop (rows 45:471, columns 41:601
    at 480 x 640, scaled proportionally at other sizes) or the Eigen mask on KITTI's benchmark crop
    (row fractions 0.3324324-0.91351351, column fractions 0.0359477-0.96405229; Garg's as an option).
    None -> all True."""
    m = np.zeros((height, width), bool)
    if name is None:
        m[:] = True
    elif name == "nyu_eigen":
        m[round(45 / 480 * height):round(471 / 480 * height),
          round(41 / 640 * width):round(601 / 640 * width)] = True
    elif name == "kitti_eigen":
        m[int(0.3324324 * height):int(0.91351351 * height), int(0.0359477 * width):int(0.96405229 * width)] = True
    elif name == "kitti_garg":
        m[int(0.40810811 * height):int(0.99189189 * height),
          int(0.03594771 * width):int(0.96405229 * width)] = True
    else:
        raise ValueError(f"unknown evaluation crop {name!r}: use nyu_eigen, kitti_eigen, kitti_garg or None")
    return m


def read_split_file(split_file, columns):
    """Lines of whitespace-separated paths relative to the data set root; extra columns (KITTI's focal
    length, a comment) are kept. Returns a list of lists. A line with fewer than `columns` entries is
    an error naming the file and line. Blank lines are skipped."""
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"missing split file: {split_file}")
    rows = []
    with open(split_file) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < columns:
                want = "rgb depth" + (" mask" if columns == 3 else "")
                raise ValueError(f"{split_file} line {n}: expected {columns} paths ({want}), got {line.strip()!r}")
            rows.append(parts)
    if not rows:
        raise ValueError(f"split file {split_file} lists no samples")
    return rows


class DepthFileDataset(torch.utils.data.Dataset):
    """One data set on disk in its Marigold layout: kind is a key of LAYOUTS. root is the extracted
    archive folder, split_file lists 'rgb_path depth_path [...]' relative to root.

    kb_crop: KITTI benchmark crop (default: on for kitti and vkitti, as Marigold).
    eval_mask: AND the valid mask with the data set's evaluation crop, DEPTH_KINDS[kind]["eval_crop"]
               (default: on for nyu and kitti; off for vkitti, whose Eigen crop Marigold applies only
               when validating).
    size: (H, W) to resize to (RGB bilinear with antialiasing; depth and mask nearest, so no depth is
          invented across edges). None keeps the file's size (do that for evaluation)."""

    def __init__(self, kind, root, split_file, size=None, kb_crop=None, eval_mask=None):
        _check_kind(kind)
        if os.path.isfile(root):
            raise ValueError(f"{root} is a file: extract the archive first (tar -xf {root}) and pass the folder")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"missing data set folder: {root}")
        self.kind, self.root, self.size = kind, root, size
        self.spec = DEPTH_KINDS[kind]
        self.kb_crop = self.spec["kb_crop"] if kb_crop is None else kb_crop
        use = self.spec["eval_default"] if eval_mask is None else eval_mask
        self.eval_crop = self.spec["eval_crop"] if use else None
        self.min_depth, self.max_depth = self.spec["min_depth"], self.spec["max_depth"]
        rows = read_split_file(split_file, 3 if kind == "diode" else 2)
        self.rows = [r for r in rows if r[1] != "None"]  # KITTI frames without depth, dropped as Marigold
        if not self.rows:
            raise ValueError(f"split file {split_file} lists no samples with depth")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        rgb = read_rgb(os.path.join(self.root, row[0]))  # (H, W, 3)
        depth = read_depth_file(self.kind, os.path.join(self.root, row[1]), rgb.shape[:2])
        if depth.shape != rgb.shape[:2]:
            raise ValueError(f"{row[1]}: depth is {depth.shape[1]}x{depth.shape[0]} but {row[0]} is "
                             f"{rgb.shape[1]}x{rgb.shape[0]}")
        if self.kind == "diode":  # the mask file alone says what is valid (as Marigold)
            mask = _read_npy(os.path.join(self.root, row[2])) > 0
            if mask.shape != depth.shape:
                raise ValueError(f"{row[2]}: mask shape {mask.shape} differs from depth {depth.shape}")
            valid = mask & (depth > 0)
        else:
            valid = (depth > self.min_depth) & (depth < self.max_depth)
        if self.kb_crop:
            rgb = kitti_benchmark_crop(rgb.transpose(2, 0, 1)).transpose(1, 2, 0)
            depth, valid = kitti_benchmark_crop(depth), kitti_benchmark_crop(valid)
        if self.eval_crop is not None:
            valid = valid & eval_crop_mask(self.eval_crop, *valid.shape)
        item = _to_item(rgb, depth, valid, row[0])
        return resize_item(item, self.size) if self.size is not None else item


def resize_item(item, size):
    """Resize an item to size=(H, W): RGB bilinear (antialiased), depth and valid nearest."""
    rgb = F.interpolate(item["rgb"][None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    depth = F.interpolate(item["depth"][None], size=size, mode="nearest-exact")[0]
    valid = F.interpolate(item["valid"][None].float(), size=size, mode="nearest-exact")[0] > 0.5
    return dict(item, rgb=rgb.clamp(-1, 1), depth=depth * valid, valid=valid)


class EpochMix:
    """Which item of which data set training sample n is, for n = 0, 1, 2, ... over the whole run.

    Every item of every set is seen once per epoch of that set (a fresh permutation per set and
    epoch), and each sample picks its set with `probs` (Marigold and the official code: Hypersim 0.9,
    Virtual KITTI 2 0.1), so the smaller set cycles faster. Sample n is a pure function of
    (seed, n): a resumed run continues exactly, and DDP ranks agree on the stream without talking
    (rank r of W takes its share of each global batch). Drawing one fixed item per index instead
    would leave about 1/e of a set never seen."""
    BLOCK = 1 << 16          # set choices are drawn in blocks of samples, each from its own seed

    def __init__(self, sizes, probs=None, seed=0):
        sizes = [int(s) for s in sizes]
        probs = [1.0] * len(sizes) if probs is None else list(probs)
        if not sizes or len(sizes) != len(probs) or min(sizes) < 1 or min(probs) <= 0:
            raise ValueError(f"EpochMix: need non-empty data sets and positive probabilities, got sizes "
                             f"{sizes} and probabilities {probs}")
        self.sizes, self.seed = sizes, seed
        self.cum = np.cumsum(np.asarray(probs, float) / sum(probs))
        self._blocks, self._perms = {}, {}

    def _block(self, b):
        """For block b: the set of each sample, its position among that set's samples in the block,
        and how many samples of each set came before the block."""
        if b not in self._blocks:
            before = np.zeros(len(self.sizes), np.int64)
            if b > 0:
                choice, _, prev = self._block(b - 1)
                before = prev + np.bincount(choice, minlength=len(self.sizes))
            u = np.random.default_rng([self.seed, 0, b]).random(self.BLOCK)
            choice = np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.sizes) - 1)
            within = np.empty(self.BLOCK, np.int64)
            for k in range(len(self.sizes)):
                at = np.flatnonzero(choice == k)
                within[at] = np.arange(len(at))
            self._blocks[b] = (choice, within, before)
        return self._blocks[b]

    def _perm(self, k, epoch):
        if (k, epoch) not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            self._perms[k, epoch] = np.random.default_rng([self.seed, 1, k, epoch]).permutation(self.sizes[k])
        return self._perms[k, epoch]

    def __call__(self, n):
        """(set index, item index) of sample n."""
        b, r = divmod(int(n), self.BLOCK)
        choice, within, before = self._block(b)
        k = int(choice[r])
        j = int(before[k] + within[r])                  # how many samples of set k came before n
        epoch, pos = divmod(j, self.sizes[k])
        return k, int(self._perm(k, epoch)[pos])


class MixedDataset(torch.utils.data.Dataset):
    """Several data sets as one stream of training samples (see EpochMix): item n is sample n of the
    run, for any n >= 0; len() is one nominal pass (the sum of the lengths). Items must share one size
    across data sets to be batched: give the loaders the same `size`."""

    def __init__(self, datasets, probs=(0.9, 0.1), seed=0):
        if len(datasets) != len(probs) or not datasets:
            raise ValueError(f"MixedDataset: {len(datasets)} data sets but {len(probs)} probabilities")
        for ds in datasets:
            if len(ds) == 0:
                raise ValueError(f"MixedDataset: {type(ds).__name__} is empty")
        self.datasets = datasets
        self.mix = EpochMix([len(d) for d in datasets], probs, seed)

    def __len__(self):
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, n):
        k, i = self.mix(n)
        return self.datasets[k][i]


def write_depth_set(kind, root, samples, split_name="test"):
    """Write samples in `kind`'s layout (LAYOUTS) under root, so the real loaders can be exercised on
    rendered data; returns the split file's path. samples: dicts with rgb (H, W, 3) in [0, 1], depth
    (H, W) metres, valid (H, W), and for KITTI's third column focal (pixels): render_scene's output.
    NYU's filled depth is the depth with holes set to the farthest valid depth."""
    _check_kind(kind)
    if not samples:
        raise ValueError(f"write_depth_set({kind!r}): no samples to write")
    lines = []
    for i, s in enumerate(samples):
        paths = [p.format(i=i, g=i // 100, s=split_name) for p in LAYOUTS[kind]]
        full = [os.path.join(root, p) for p in paths]
        valid = np.asarray(s["valid"], bool)
        save_image(full[0], np.round(np.clip(s["rgb"], 0, 1) * 255).astype(np.uint8))
        write_depth_file(kind, full[1], s["depth"], valid)
        if kind == "nyu":
            filled = np.where(valid, s["depth"], np.max(np.where(valid, s["depth"], 0)))
            write_depth_file(kind, full[2], filled, np.ones_like(valid))
        if kind == "diode":
            _atomic(full[2], lambda f: np.save(f, valid.astype(np.float32)))
        lines.append(" ".join(paths) + (f" {s.get('focal', 721.5377):.4f}" if kind == "kitti" else ""))
    path = os.path.join(root, f"filename_list_{split_name}.txt")
    _atomic(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return path


# -----------------------------------------------------------------------------
# 3. Depth normalisation
#
# Policy for invalid pixels (sky, holes, beyond the cap), used by training:
#   - they are excluded from the quantiles;
#   - after normalisation they are filled with +1, the far plane (as Marigold; sky is far, so the
#     autoencoder sees a plausible image rather than a hole);
#   - the loss ignores them through latent_valid_mask: a latent pixel counts only if every image
#     pixel under it is valid (the official code's bilinear-resize-then-"== 1" test, made exact).
# Depth is capped at 120 m first (the official code's far plane). The official code takes quantiles
# over all pixels after filling holes; we take them over valid pixels only, as Marigold does.

DEPTH_CAP = 120.0
NORM_QUANTILES = {"log": 0.01, "affine": 0.02}


def normalize_depth(depth, valid, mode="log", q=None, cap=DEPTH_CAP):
    """Per-image normalisation of metric depth to [-1, 1].
    depth, valid: (B, 1, H, W) or (1, H, W) tensors. mode 'log' (default; DepthFM and the official
    code): x = 2 (log d - log lo) / (log hi - log lo) - 1 with lo, hi the q and 1 - q quantiles of the
    valid depths (q = 1%); mode 'affine' (Marigold): the same on d itself, q = 2%. Values outside
    [lo, hi] are clipped to [-1, 1]; invalid pixels are set to +1.
    Returns (x, lo, hi) with lo, hi (B,) in metres: denormalize_depth(x, lo, hi, mode) inverts."""
    if mode not in NORM_QUANTILES:
        raise ValueError(f"unknown depth normalisation {mode!r}: use 'log' or 'affine'")
    q = NORM_QUANTILES[mode] if q is None else q
    squeeze = depth.dim() == 3
    if squeeze:
        depth, valid = depth[None], valid[None]
    d = depth.float().clamp(max=cap)
    ok = valid & (d > 0)
    flat = torch.where(ok, d, torch.nan).flatten(1)  # (B, HW)
    qs = torch.nanquantile(flat, flat.new_tensor([q, 1 - q]), dim=1)  # (2, B), on depth's device
    lo, hi = qs[0], qs[1]
    lo = torch.where(torch.isnan(lo), torch.ones_like(lo), lo)  # no valid pixel: any range will do
    hi = torch.where(torch.isnan(hi), torch.ones_like(hi), hi)
    f = _norm_fn(mode)
    lo_f, hi_f = f(lo)[:, None, None, None], f(hi)[:, None, None, None]
    x = 2 * (f(d.clamp(min=1e-6)) - lo_f) / (hi_f - lo_f).clamp(min=1e-6) - 1
    x = torch.where(ok, x.clamp(-1, 1), torch.ones_like(x))
    return (x[0] if squeeze else x), lo, hi


def denormalize_depth(x, lo, hi, mode="log"):
    """Inverse of normalize_depth for pixels whose depth lay within [lo, hi]: metres."""
    if mode not in NORM_QUANTILES:
        raise ValueError(f"unknown depth normalisation {mode!r}: use 'log' or 'affine'")
    f = _norm_fn(mode)
    lo_f, hi_f = f(torch.as_tensor(lo, dtype=x.dtype)), f(torch.as_tensor(hi, dtype=x.dtype))
    if lo_f.dim() == 1:  # one (lo, hi) per image of a batch
        lo_f, hi_f = lo_f.view(-1, *[1] * (x.dim() - 1)), hi_f.view(-1, *[1] * (x.dim() - 1))
    y = (x + 1) / 2 * (hi_f - lo_f).clamp(min=1e-6) + lo_f
    return y.exp() if mode == "log" else y


def _norm_fn(mode):
    return torch.log if mode == "log" else (lambda t: t)


def latent_valid_mask(valid, factor=8):
    """(B, 1, H, W) bool -> (B, 1, H/factor, W/factor) bool: True only where all factor x factor
    pixels under the latent pixel are valid (the loss mask)."""
    return -F.max_pool2d(-valid.float(), factor) > 0.5


def mean_normalized_depth(dataset, n=None, mode="log"):
    """The trivial baseline: the mean normalised depth map over the first n items of a data set
    (what a model that ignores its input would learn under an MSE loss). (1, H, W)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if n == 0:
        raise ValueError("mean_normalized_depth: empty data set")
    total = 0
    for i in range(n):
        it = dataset[i]
        total = total + normalize_depth(it["depth"], it["valid"], mode)[0]
    return total / n
