"""Tests for data.py: renderer geometry against closed forms, file layouts round-trip, normalisation,
and the evaluation protocol on hand-made cases. Seconds-scale on 2 CPU cores."""

import math
import os

import numpy as np
import pytest
import torch

import data
import depth_eval
import scenes

# -----------------------------------------------------------------------------
# renderer


def make_scene(planes=(), spheres=(), boxes=(), quads=(), pos=(0.0, 0.0, 0.0), yaw=0.0, pitch=0.0,
               hfov_deg=60.0):
    """A hand-made scene description in render()'s format: a closed 'room' kind, so no sky."""
    rng = np.random.default_rng(0)
    mat = scenes._material(rng)
    return dict(kind="room", focal_frac=0.5 / math.tan(math.radians(hfov_deg) / 2),
                planes=[dict(n=np.array(n, float), c=c, material=mat) for n, c in planes],
                spheres=[dict(c=np.array(c, float), r=r, material=mat) for c, r in spheres],
                boxes=[dict(c=np.array(c, float), half=np.array(h, float), yaw=0.0, rot=np.eye(3), material=mat)
                       for c, h in boxes],
                quads=[dict(c=np.array(c, float), ax=np.array([1.0, 0, 0]), ay=np.array([0, 1.0, 0]),
                            half=np.array(h, float), material=mat) for c, h in quads],
                ambient=0.2, exposure=1.0, light_color=np.ones(3), max_depth=80.0,
                light=dict(kind="point", pos=np.array([0.0, -1.0, 0.0]), power=1.0, falloff=10.0),
                camera=dict(pos=np.array(pos, float), rot=data.camera_rotation(yaw, pitch)))


def pixel_grid(h, w, focal):
    """Pixel-centre coordinates relative to the image centre, in pixels: x (H, W), y (H, W)."""
    y, x = np.meshgrid(np.arange(h) + 0.5 - h / 2, np.arange(w) + 0.5 - w / 2, indexing="ij")
    return x, y


def test_plane_at_known_distance_gives_exact_depth():
    # a wall facing the camera at z = 7 (normal towards the camera): planar depth is 7 everywhere
    out = data.render(make_scene(planes=[((0, 0, -1), -7.0)]), 24, 32)
    assert out["valid"].all()
    np.testing.assert_allclose(out["depth"], 7.0, rtol=1e-6)
    # a box face and a quad parallel to the image plane, in front of that wall
    out = data.render(make_scene(planes=[((0, 0, -1), -7.0)], boxes=[((-1.0, 0, 4.0), (0.5, 0.5, 0.5))],
                                 quads=[((1.0, 0, 3.0), (0.4, 0.4))]), 48, 64)
    f = out["focal"]
    x, y = pixel_grid(48, 64, f)
    in_box = (np.abs(x / f * 3.5 + 1.0) < 0.5 - 1e-3) & (np.abs(y / f * 3.5) < 0.5 - 1e-3)  # front face at z = 3.5
    in_quad = (np.abs(x / f * 3.0 - 1.0) < 0.4 - 1e-3) & (np.abs(y / f * 3.0) < 0.4 - 1e-3)
    assert in_box.sum() > 20 and in_quad.sum() > 20
    np.testing.assert_allclose(out["depth"][in_box], 3.5, rtol=1e-6)
    np.testing.assert_allclose(out["depth"][in_quad], 3.0, rtol=1e-6)
    wall = np.abs(y) > f * 0.5 / 3.5 + 1  # rows above and below both objects (and the box's sides)
    assert wall.sum() > 500
    np.testing.assert_allclose(out["depth"][wall], 7.0, rtol=1e-6)


def test_level_camera_over_floor_matches_closed_form():
    # camera 1.6 m above the floor looking level: a pixel y px below the centre sees the floor at
    # planar depth h * f / y; above the horizon it sees the far wall at z = 50
    h, H, W = 1.6, 40, 30
    out = data.render(make_scene(planes=[((0, 1, 0), 0.0), ((0, 0, -1), -50.0)], pos=(0, h, 0)), H, W)
    f = out["focal"]
    _, y = pixel_grid(H, W, f)
    want = np.where(y > 0, np.minimum(h * f / np.maximum(y, 1e-9), 50.0), 50.0)
    np.testing.assert_allclose(out["depth"], want, rtol=1e-6)


def test_sphere_depth_lies_on_its_analytic_surface():
    c, r = np.array([0.4, -0.3, 5.0]), 1.2
    H, W = 48, 64
    out = data.render(make_scene(planes=[((0, 0, -1), -30.0)], spheres=[(c, r)], yaw=0.1, pitch=0.05), H, W,
                      return_distance=True)
    f, rot = out["focal"], data.camera_rotation(0.1, 0.05)
    x, y = pixel_grid(H, W, f)
    rays = np.stack([x / f, y / f, np.ones_like(x)], -1) @ rot.T  # (H, W, 3), camera-frame z = 1
    # the silhouette: rays passing within r of the centre (closed form for a line-point distance)
    u = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    miss_dist = np.linalg.norm(np.cross(u, c), axis=-1)
    on_sphere = miss_dist < r - 1e-6
    off_sphere = miss_dist > r + 1e-6
    assert on_sphere.sum() > 100
    # back-projected hit points lie on the sphere; the nearest point is at distance |c| - r
    pts = out["depth"][..., None] * rays
    np.testing.assert_allclose(np.linalg.norm(pts[on_sphere] - c, axis=-1), r, rtol=1e-5)
    assert abs(out["distance"][on_sphere].min() - (np.linalg.norm(c) - r)) < 0.02
    # the far wall z = 30 in world coordinates behind it
    np.testing.assert_allclose(pts[off_sphere][:, 2], 30.0, rtol=1e-5)


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = data.render_scene(7, 32, 48), data.render_scene(7, 32, 48), data.render_scene(8, 32, 48)
    for k in ("rgb", "depth", "valid"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["focal"] == b["focal"]
    assert np.abs(a["depth"] - c["depth"]).mean() > 0.1 and np.abs(a["rgb"] - c["rgb"]).mean() > 0.02
    assert a["rgb"].dtype == np.float32 and a["rgb"].min() >= 0 and a["rgb"].max() <= 1
    assert ((a["depth"] > 0) == a["valid"]).all()


def test_open_scenes_have_sky_and_rooms_are_closed():
    kinds = {data.random_scene(s)["kind"]: s for s in range(20)}
    room = data.render_scene(kinds["room"], 24, 32)
    open_ = data.render_scene(kinds["open"], 24, 32)
    assert room["valid"].all()
    shares = [data.render_scene(s, 24, 32)["valid"].mean() for s in range(30)]
    assert min(shares) >= 0.2 and min(shares) < 1  # some sky somewhere, never mostly sky
    assert open_["depth"].max() < data.MAX_RENDER_DEPTH


def test_mean_depth_map_is_a_weak_baseline_on_heldout_scenes():
    # the DESIGN trap: a renderer dominated by the ground plane lets the mean training depth map win
    train = data.RenderedDepthDataset.split("train", 150, 32, 32)
    held = data.RenderedDepthDataset.split("heldout", 80, 32, 32)
    mean = data.mean_normalized_depth(train)[0]
    base = np.array([[depth_eval.evaluate_depth(mean, it["depth"][0], it["valid"][0])[k] for k in ("abs_rel", "delta1")]
                     for it in (held[i] for i in range(len(held)))])
    flat = np.array([depth_eval.evaluate_depth(torch.zeros(32, 32), it["depth"][0], it["valid"][0])["abs_rel"]
                     for it in (held[i] for i in range(len(held)))])
    abs_rel, delta1 = base.mean(0)
    print(f"mean-depth-map baseline on held-out scenes: AbsRel {abs_rel:.3f} delta1 {delta1:.3f}; "
          f"constant map AbsRel {flat.mean():.3f}")
    assert abs_rel > 0.25 and delta1 < 0.7
    assert abs_rel < flat.mean()  # the map knows something, and the metric can tell


def test_rendered_dataset_items_and_split():
    ds = data.RenderedDepthDataset.split("heldout", 3, 16, 24)
    it = ds[1]
    assert it["rgb"].shape == (3, 16, 24) and it["depth"].shape == (1, 16, 24) and it["valid"].dtype == torch.bool
    assert it["rgb"].min() >= -1 and it["rgb"].max() <= 1 and it["name"] == f"scene_{data.HELDOUT_SEED0 + 1}"
    ref = data.render_scene(data.HELDOUT_SEED0 + 1, 16, 24)
    np.testing.assert_allclose(it["rgb"].permute(1, 2, 0).numpy() * 0.5 + 0.5, ref["rgb"], atol=0.5 / 255 + 1e-6)
    assert torch.equal(ds[1]["depth"], it["depth"])  # cached copy is the same
    batch = torch.utils.data.default_collate([ds[0], ds[2]])
    assert batch["rgb"].shape == (2, 3, 16, 24) and batch["name"][1] == f"scene_{data.HELDOUT_SEED0 + 2}"
    with pytest.raises(IndexError):
        ds[3]


# -----------------------------------------------------------------------------
# files


def test_hypersim_distance_to_planar_is_exact_on_rendered_data():
    for seed in (3, 4):
        out = data.render_scene(seed, 30, 40, return_distance=True)
        hit = out["distance"] > 0
        planar = data.distance_to_planar(out["distance"], out["focal"])
        np.testing.assert_allclose(planar[out["valid"]], out["depth"][out["valid"]], rtol=1e-5)
        back = data.planar_to_distance(planar, out["focal"])
        np.testing.assert_allclose(back[hit], out["distance"][hit], rtol=1e-12)
    # Hypersim's own numbers: at 1024 x 768 the corner pixel centre is (511.5, 383.5) px off-axis
    d = data.distance_to_planar(np.ones((768, 1024)))
    assert abs(d[0, 0] - 886.81 / math.sqrt(511.5 ** 2 + 383.5 ** 2 + 886.81 ** 2)) < 1e-12
    assert d[384, 512] == pytest.approx(886.81 / math.sqrt(0.5 ** 2 + 0.5 ** 2 + 886.81 ** 2), abs=1e-15)


def _samples():
    """A room (all valid) and an open scene (sky), plus a hole, at 48 x 64."""
    room = next(s for s in range(50) if data.random_scene(s)["kind"] == "room")
    # some sky, and some ground nearer than NYU's 10 m cap, so every format stores part of it
    sky = next(o for o in (data.render_scene(s, 48, 64) for s in range(50))
               if 0.3 < o["valid"].mean() < 0.95 and (o["depth"][o["valid"]] < 8).mean() > 0.1)
    out = [data.render_scene(room, 48, 64), sky]
    out[0]["valid"] = out[0]["valid"].copy()
    out[0]["valid"][5:9, 10:20] = False  # a hole in the ground truth
    out[0]["depth"] = np.where(out[0]["valid"], out[0]["depth"], 0)
    assert not out[1]["valid"].all()
    return out


# quantisation step of each encoding (metres); rounding gives half of it
STEP = dict(hypersim=1e-3, vkitti=1e-2, nyu=1e-3, kitti=1 / 256, eth3d=0.0, scannet=1e-3, diode=0.0)


@pytest.mark.parametrize("kind", ["hypersim", "vkitti", "nyu", "kitti", "eth3d", "scannet", "diode"])
def test_writer_and_loader_round_trip(kind, tmp_path):
    samples = _samples()
    split = data.write_depth_set(kind, str(tmp_path), samples)
    ds = data.DepthFileDataset(kind, str(tmp_path), split, kb_crop=False, eval_mask=False)
    assert len(ds) == len(samples)
    spec = data.DEPTH_KINDS[kind]
    for s, i in zip(samples, range(len(ds))):
        it = ds[i]
        assert os.path.isfile(os.path.join(str(tmp_path), it["name"]))
        rgb = it["rgb"].permute(1, 2, 0).numpy() * 0.5 + 0.5
        err = np.abs(rgb - s["rgb"])
        if it["name"].lower().endswith(".png"):
            assert err.max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
        else:
            assert err.mean() < 0.03  # JPEG
        want_valid = s["valid"] & (s["depth"] > spec["min_depth"]) & (s["depth"] < spec["max_depth"] - STEP[kind])
        got_valid = it["valid"][0].numpy()
        np.testing.assert_array_equal(got_valid[want_valid], True)
        assert not got_valid[~s["valid"]].any()
        d = it["depth"][0].numpy()
        err = np.abs(d - s["depth"])[want_valid].max()
        assert err <= STEP[kind] / 2 + 1e-6 * s["depth"].max(), (kind, err)
        assert (d[~got_valid] == 0).all()


def test_vkitti_sky_is_invalid_and_stored_as_65535(tmp_path):
    s = _samples()[1]
    split = data.write_depth_set("vkitti", str(tmp_path), [s])
    raw = data.read_png16(os.path.join(str(tmp_path), data.read_split_file(split, 2)[0][1]))
    assert (raw[~s["valid"]] == 65535).all() and raw[s["valid"]].max() < 8000


def test_eval_crops_and_kitti_benchmark_crop(tmp_path):
    m = data.eval_crop_mask("nyu_eigen", 480, 640)
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (45, 471, 41, 601) and m[45:471, 41:601].all()
    x = np.arange(376 * 1242).reshape(376, 1242)
    np.testing.assert_array_equal(data.kitti_benchmark_crop(x), x[24:376, 13:1229])
    with pytest.raises(ValueError, match="kb_crop=False"):
        data.kitti_benchmark_crop(np.zeros((48, 64)))
    k = data.eval_crop_mask("kitti_eigen", 352, 1216)
    rows, cols = np.nonzero(k.any(1))[0], np.nonzero(k.any(0))[0]
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (117, 321, 43, 1172) and k.sum() == 204 * 1129
    # the loader applies the evaluation crop: NYU's Eigen crop at its native 480 x 640
    s = dict(rgb=np.full((480, 640, 3), 0.5), depth=np.full((480, 640), 3.0), valid=np.ones((480, 640), bool))
    split = data.write_depth_set("nyu", str(tmp_path), [s])
    it = data.DepthFileDataset("nyu", str(tmp_path), split)[0]
    np.testing.assert_array_equal(it["valid"][0].numpy(), m)


def test_kitti_lines_without_ground_truth_are_dropped_and_focal_is_kept(tmp_path):
    split = data.write_depth_set("kitti", str(tmp_path), _samples())
    with open(split, "a") as f:
        f.write("2011_09_26/x/image_02/data/0000000099.png None 721.5377\n")
    rows = data.read_split_file(split, 2)
    assert len(rows) == 3 and len(rows[0]) == 3 and float(rows[0][2]) > 0
    assert len(data.DepthFileDataset("kitti", str(tmp_path), split, kb_crop=False)) == 2


def test_mixed_dataset_draws_about_nine_to_one(tmp_path):
    a = data.RenderedDepthDataset(0, 5, 8, 8)
    b = data.RenderedDepthDataset(500, 5, 8, 8)
    mix = data.MixedDataset([a, b], (0.9, 0.1), seed=1)
    names = [mix[i]["name"] for i in range(0, 3000, 3)]
    share_b = np.mean([int(n.split("_")[1]) >= 500 for n in names])
    assert abs(share_b - 0.1) < 0.03
    assert mix[17]["name"] == data.MixedDataset([a, b], (0.9, 0.1), seed=1)[17]["name"]
    resized = data.resize_item(a[0], (16, 12))
    assert resized["rgb"].shape == (3, 16, 12) and resized["valid"].shape == (1, 16, 12)
    assert (resized["depth"][~resized["valid"]] == 0).all()


def test_epoch_mix_sees_every_item_once_per_epoch_and_resumes_exactly():
    """Drawing one random item per index leaves about 1/e of a set unseen; the epoch stream leaves none."""
    sizes = (997, 61)
    mix = data.EpochMix(sizes, (0.9, 0.1), seed=5)
    draws = np.array([mix(n) for n in range(3 * data.EpochMix.BLOCK // 2)])   # crosses a block boundary
    for k, size in enumerate(sizes):
        items = draws[draws[:, 0] == k, 1]
        epochs = len(items) // size
        assert epochs >= 2
        for e in range(epochs):      # each full epoch of set k is a permutation of all its items
            assert sorted(items[e * size:(e + 1) * size].tolist()) == list(range(size))
        assert not np.array_equal(items[:size], items[size:2 * size])     # a fresh order per epoch
    # a fresh object (a resumed run, another rank) gives the same samples, from anywhere in the stream
    fresh = data.EpochMix(sizes, (0.9, 0.1), seed=5)
    for n in (len(draws) - 1, data.EpochMix.BLOCK, 12345, 0):
        assert fresh(n) == tuple(draws[n])
    assert data.EpochMix(sizes, (0.9, 0.1), seed=6)(0) != mix(0) or data.EpochMix(sizes, (0.9, 0.1), seed=6)(1) != mix(1)


# -----------------------------------------------------------------------------
# bad input: one clear error naming the file


def test_bad_input_errors_name_the_file(tmp_path):
    root = str(tmp_path)
    split = data.write_depth_set("hypersim", root, _samples()[:1])
    rgb_rel, depth_rel = data.read_split_file(split, 2)[0][:2]
    # unreadable image
    with open(os.path.join(root, rgb_rel), "wb") as f:
        f.write(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read image .*rgb_cam_00_fr0000.png"):
        data.DepthFileDataset("hypersim", root, split)[0]
    # missing depth file
    data.write_depth_set("hypersim", root, _samples()[:1])
    os.remove(os.path.join(root, depth_rel))
    with pytest.raises(FileNotFoundError, match="depth_plane_cam_00_fr0000.png"):
        data.DepthFileDataset("hypersim", root, split)[0]
    # empty data set
    empty = os.path.join(root, "empty.txt")
    open(empty, "w").write("\n\n")
    with pytest.raises(ValueError, match="empty.txt lists no samples"):
        data.DepthFileDataset("hypersim", root, empty)
    # malformed split line
    bad = os.path.join(root, "bad.txt")
    open(bad, "w").write("a.png b.png\nonly_one_path.png\n")
    with pytest.raises(ValueError, match="bad.txt line 2"):
        data.DepthFileDataset("hypersim", root, bad)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.DepthFileDataset("hypersim", root, os.path.join(root, "nope.txt"))
    with pytest.raises(ValueError, match="unknown data set kind 'hypersym'"):
        data.DepthFileDataset("hypersym", root, split)
    with pytest.raises(ValueError, match="extract the archive"):
        data.DepthFileDataset("hypersim", split, split)
    with pytest.raises(ValueError, match="n > 0"):
        data.RenderedDepthDataset(0, 0)
    # ETH3D raw depth of the wrong size
    e = os.path.join(root, "eth")
    split = data.write_depth_set("eth3d", e, _samples()[:1])
    dep = os.path.join(e, data.read_split_file(split, 2)[0][1])
    open(dep, "wb").write(b"\0" * 40)
    with pytest.raises(ValueError, match="DSC_0000.JPG: 10 float32 values"):
        data.DepthFileDataset("eth3d", e, split)[0]
    # a depth PNG that is not single-channel
    s = _samples()[0]
    split = data.write_depth_set("scannet", os.path.join(root, "sc"), [s])
    dep = os.path.join(root, "sc", data.read_split_file(split, 2)[0][1])
    data.save_image(dep, np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="single-channel 16-bit"):
        data.DepthFileDataset("scannet", os.path.join(root, "sc"), split)[0]
    # no temporary files left behind by the atomic writers
    assert not [n for _, _, fs in os.walk(root) for n in fs if ".tmp" in n]


# -----------------------------------------------------------------------------
# normalisation


@pytest.mark.parametrize("mode", ["log", "affine"])
def test_normalisation_inverts_and_ignores_invalid_pixels(mode):
    g = torch.Generator().manual_seed(0)
    depth = torch.exp(torch.rand(2, 1, 20, 24, generator=g) * 4 - 1)  # 0.37 .. 20 m
    valid = torch.rand(2, 1, 20, 24, generator=g) > 0.2
    x, lo, hi = data.normalize_depth(depth, valid, mode)
    q = data.NORM_QUANTILES[mode]
    for b in range(2):  # quantiles over the valid pixels only, as numpy computes them
        v = depth[b][valid[b]].numpy().astype(np.float64)
        np.testing.assert_allclose([lo[b], hi[b]], np.quantile(v, [q, 1 - q]), rtol=1e-5)
    assert x.min() >= -1 and x.max() <= 1 and (x[~valid] == 1).all()
    inside = valid & (depth >= lo[:, None, None, None]) & (depth <= hi[:, None, None, None])
    back = data.denormalize_depth(x, lo, hi, mode)
    np.testing.assert_allclose(back[inside], depth[inside], rtol=1e-5)
    # garbage in invalid pixels changes nothing; one image alone gives the same as in the batch
    x2, lo2, _ = data.normalize_depth(torch.where(valid, depth, torch.tensor(1e4)), valid, mode)
    assert torch.equal(x2, x) and torch.equal(lo2, lo)
    x1, lo1, hi1 = data.normalize_depth(depth[1], valid[1], mode)
    assert torch.allclose(x1, x[1]) and torch.allclose(lo1, lo[1:])
    back1 = data.denormalize_depth(x1, lo1[0], hi1[0], mode)
    np.testing.assert_allclose(back1[inside[1]], depth[1][inside[1]], rtol=1e-5)


def test_log_normalisation_is_affine_in_log_depth_and_caps_at_120():
    d = torch.tensor([[[1.0, 10.0, 100.0, 500.0]]])
    x, lo, hi = data.normalize_depth(d, torch.ones_like(d, dtype=torch.bool), "log", q=0.0)
    assert hi.item() == pytest.approx(120.0)  # 500 m is capped
    want = [2 * math.log(v) / math.log(120) - 1 for v in (1, 10, 100)]  # lo = 1 m, hi = 120 m
    np.testing.assert_allclose(x[0, 0, :3], want, rtol=1e-5)


def test_latent_valid_mask_requires_the_whole_footprint():
    v = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    v[0, 0, 3, 12] = False
    m = data.latent_valid_mask(v, 8)
    assert m.shape == (1, 1, 2, 2) and m.tolist() == [[[[True, False], [True, True]]]]


# -----------------------------------------------------------------------------
# evaluation protocol


def test_least_squares_recovers_a_known_scale_and_shift():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(30, 40, generator=g) * 2 - 1
    valid = torch.rand(30, 40, generator=g) > 0.3
    target = 2.5 * p + 0.7 + torch.where(valid, 0.0, 100.0)  # invalid pixels are wild
    a, b = depth_eval.fit_scale_shift(p, target, valid)
    assert abs(a - 2.5) < 1e-6 and abs(b - 0.7) < 1e-6
    gt = torch.exp(1.3 * p.double() + 0.4)  # a log-depth model's output is affine in log depth
    aligned, a, b = depth_eval.align_prediction(p, gt, valid, "log")
    assert abs(a - 1.3) < 1e-9 and abs(b - 0.4) < 1e-9
    np.testing.assert_allclose(aligned[valid], gt[valid], rtol=1e-9)
    aligned, a, b = depth_eval.align_prediction(p, 3.0 * p.double() + 5.0, valid, "depth")
    assert abs(a - 3.0) < 1e-9 and abs(b - 5.0) < 1e-9
    with pytest.raises(ValueError, match="alignment space 'disparity'"):
        depth_eval.align_prediction(p, gt, valid, "disparity")


def test_abs_rel_and_delta1_on_hand_made_cases():
    gt = torch.tensor([1.0, 1.0, 4.0, 2.0, 10.0])
    pred = torch.tensor([1.0, 2.0, 4.0, 2.4, 0.0])
    valid = torch.tensor([True, True, True, True, False])  # the last pixel is wildly wrong but invalid
    m = depth_eval.depth_metrics(pred, gt, valid)
    assert m["abs_rel"] == pytest.approx((0 + 1 + 0 + 0.2) / 4)
    assert m["delta1"] == pytest.approx(3 / 4)  # 2/1 fails, 2.4/2 = 1.2 passes
    m = depth_eval.depth_metrics(torch.tensor([1.26, 1 / 1.24]), torch.tensor([1.0, 1.0]), torch.tensor([True, True]))
    assert m["delta1"] == 0.5
    with pytest.raises(ValueError, match="no valid"):
        depth_eval.depth_metrics(pred, gt, torch.zeros(5, dtype=torch.bool))


def test_evaluate_depth_clips_to_the_data_set_range():
    gt = torch.tensor([[2.0, 8.0], [9.0, 9.5]])
    pred = torch.tensor([[2.0, 8.0], [9.0, 40.0]])  # affine-exact except the last, which will clip at 10 m
    valid = torch.tensor([[True, True], [True, False]])
    r = depth_eval.evaluate_depth(pred, gt, valid, kind="nyu", space="depth")
    assert r["abs_rel"] < 1e-9 and r["delta1"] == 1.0 and r["scale"] == pytest.approx(1.0)
    r = depth_eval.evaluate_depth(pred, gt, torch.ones(2, 2, dtype=torch.bool), kind="nyu", space="depth")
    assert r["abs_rel"] > 0.01


def test_ensemble_alignment_recovers_truth_from_affine_copies():
    g = torch.Generator().manual_seed(2)
    coarse = torch.rand(1, 1, 6, 8, generator=g)
    truth = torch.nn.functional.interpolate(coarse, size=(24, 32), mode="bilinear")[0, 0]
    scales, shifts = torch.rand(5, generator=g) * 2 + 0.3, torch.rand(5, generator=g) * 2 - 1
    copies = scales[:, None, None] * truth + shifts[:, None, None]
    merged, spread = depth_eval.ensemble_align(copies)
    everywhere = torch.ones(24, 32, dtype=torch.bool)
    aligned, _, _ = depth_eval.align_prediction(merged, truth.double().exp(), everywhere, "log")
    np.testing.assert_allclose(aligned.log(), truth.double(), atol=1e-5)
    assert spread.max() < 1e-5
    # the gauge: the merged map keeps the members' average mean and spread
    assert abs(merged.mean() - copies.mean()) < 1e-4 and abs(merged.std() - copies.std((1, 2)).mean()) < 1e-4
    # robustness: each member is wrong in its own corner; the median of the aligned members is not
    noisy = copies.clone()
    for k in range(5):
        noisy[k, (k * 4):(k * 4 + 4), :8] += 3.0 * scales[k]
    merged, spread = depth_eval.ensemble_align(noisy[:, None], reduction="median")
    assert merged.shape == (1, 24, 32)
    err_merged = _affine_residual(merged[0], truth)
    err_members = min(_affine_residual(noisy[k], truth) for k in range(5))
    assert err_merged < 1e-4 and err_members > 0.3  # exact up to float32, though no member is
    err_mean = _affine_residual(depth_eval.ensemble_align(noisy, reduction="mean")[0], truth)
    assert err_mean > 100 * err_merged  # the median is what removes the outliers
    # the spread map shows where members disagree: noise on the left half only
    noise = torch.randn(5, 24, 32, generator=g) * 0.05 * scales[:, None, None]
    noise[:, :, 16:] = 0
    _, spread = depth_eval.ensemble_align(copies + noise)
    assert spread[:, :16].mean() > 0.01 and spread[:, 16:].mean() < spread[:, :16].mean() / 5


def _affine_residual(x, truth):
    a, b = depth_eval.fit_scale_shift(x, truth, torch.ones_like(truth, dtype=torch.bool))
    return float((a * x.double() + b - truth.double()).abs().max())
