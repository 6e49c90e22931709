"""Depth evaluation: Marigold's metrics on hand-made cases, the paper's protocol (depth-space fit, 384×512
and back), and `sample.py --eval all` end to end on small written copies of the five evaluation sets."""
import math

import pytest
import torch

import data
import depth_eval


# --- metrics: each one on arrays small enough to compute by hand --------------------------------------

def test_each_metric_on_a_hand_made_case():
    ratios = [1.0, 1.2, 1.4, 1.8, 3.0]            # p / g; truth 2 m everywhere, so g² != g (SqRel divides by g)
    gt, pred = torch.full((5,), 2.0), torch.tensor([2 * r for r in ratios])
    m = depth_eval.depth_metrics(pred, gt, torch.ones(5, dtype=torch.bool))
    assert set(m) == set(depth_eval.METRICS)
    diff = [2 * r - 2 for r in ratios]            # 0, 0.4, 0.8, 1.6, 4
    e = [math.log(r) for r in ratios]
    assert m["abs_rel"] == pytest.approx((0 + 0.2 + 0.4 + 0.8 + 2.0) / 5)
    assert m["sq_rel"] == pytest.approx((0 + 0.16 + 0.64 + 2.56 + 16) / 2 / 5)          # 1.936, not 0.968
    assert m["rmse"] == pytest.approx(math.sqrt(sum(d * d for d in diff) / 5))
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in e) / 5))
    assert m["log10"] == pytest.approx(sum(math.log10(r) for r in ratios) / 5)
    # max(p/g, g/p) = 1, 1.2, 1.4, 1.8, 3 against 1.25, 1.5625, 1.953125
    assert (m["delta1"], m["delta2"], m["delta3"]) == (pytest.approx(2 / 5), pytest.approx(3 / 5), pytest.approx(4 / 5))
    assert m["i_rmse"] == pytest.approx(math.sqrt(sum((1 / (2 * r) - 0.5) ** 2 for r in ratios) / 5))
    mean_e = sum(e) / 5
    assert m["silog"] == pytest.approx(100 * math.sqrt(sum(x * x for x in e) / 5 - mean_e ** 2))


def test_metrics_ignore_invalid_pixels_and_see_scale():
    gt = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    valid = torch.tensor([[True, True], [True, False]])
    pred = torch.where(valid, 1.5 * gt, torch.tensor(1e4))        # scale 1.5 off, the invalid pixel wild
    m = depth_eval.depth_metrics(pred, gt, valid)
    assert m["abs_rel"] == pytest.approx(0.5) and m["rmse_log"] == pytest.approx(math.log(1.5))
    assert m["silog"] == pytest.approx(0, abs=1e-6)              # scale-invariant: a pure scale error is 0
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 + 1 + 4) / 3))
    assert m["i_rmse"] == pytest.approx(math.sqrt(sum((1 / (1.5 * g) - 1 / g) ** 2 for g in (1, 2, 4)) / 3))
    assert (m["delta1"], m["delta2"]) == (0.0, 1.0)              # 1.5 is outside 1.25, inside 1.5625
    with pytest.raises(ValueError, match="must be > 0"):
        depth_eval.depth_metrics(torch.zeros(2, 2), gt, valid)
    with pytest.raises(ValueError, match="no valid"):
        depth_eval.depth_metrics(pred, gt, torch.zeros(2, 2, dtype=torch.bool))


def test_prediction_to_depth_is_depthfm_exp_then_min_max():
    x = torch.tensor([[[-1.0, 0.0], [0.5, 1.0]]])                    # (1, 2, 2), near = -1
    d = depth_eval.prediction_to_depth(x, "log")
    e = torch.exp(x.double())
    expect = (e - e.min()) / (e.max() - e.min())
    torch.testing.assert_close(d.double(), expect)
    assert d.dtype == x.dtype and d.min() == 0 and d.max() == 1 and d[0, 0, 0] == 0     # near stays 0
    torch.testing.assert_close(depth_eval.prediction_to_depth(x, "affine"), (x + 1) / 2)   # affine: min-max only
    assert depth_eval.prediction_to_depth(torch.ones(1, 3, 3), "log").abs().max() == 0      # constant: 0, not nan
    two = depth_eval.prediction_to_depth(torch.stack([x[0], 3 * x[0]]), "log")           # per image, not per batch
    assert two[1].min() == 0 and two[1].max() == 1
    with pytest.raises(ValueError, match="normalisation 'metric'"):
        depth_eval.prediction_to_depth(x, "metric")


def test_an_affine_map_of_the_truth_scores_zero_error_in_depth_space():
    g = torch.Generator().manual_seed(0)
    gt = 0.5 + 9 * torch.rand(24, 32, generator=g, dtype=torch.float64)
    valid = torch.rand(24, 32, generator=g) > 0.2
    pred = torch.where(valid, 0.3 * gt + 1.7, torch.tensor(-50.0, dtype=torch.float64))   # invalid pixels wild
    r = depth_eval.evaluate_depth(pred, gt, valid, "nyu", "depth")
    assert r["scale"] == pytest.approx(1 / 0.3) and r["shift"] == pytest.approx(-1.7 / 0.3)
    for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "i_rmse", "silog"):
        assert r[k] == pytest.approx(0, abs=1e-9), k
    assert r["delta1"] == r["delta2"] == r["delta3"] == 1.0
    # through the paper's chain: a log-model output whose exp is affine in depth (exp x = 0.2 g + 1) is
    # exact after DepthFM's exp + min-max and the depth-space fit; the log-space fit of the same x is not
    x = torch.log(0.2 * gt + 1)
    r = depth_eval.evaluate_depth(depth_eval.prediction_to_depth(x, "log"), gt, valid, "nyu", "depth")
    assert r["abs_rel"] < 1e-9 and r["silog"] < 1e-5
    assert depth_eval.evaluate_depth(x, gt, valid, "nyu", "log")["abs_rel"] > 0.01


# --- the protocol in sample.py -----------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

import sample  # noqa: E402
import train  # noqa: E402
from test_depth import FAST, no_temp_files, tiny_ckpt  # noqa: E402,F401  (the tiny checkpoint fixture)


def test_protocol_settings_and_labels():
    st = depth_eval.eval_settings("paper", "log", 512, 64)                 # an SD run trained at 384×512
    assert (st["size"], st["steps"], st["ensemble"], st["align"], st["label"]) == ((384, 512), 10, 4, "depth", "paper")
    assert "384×512" in st["text"] and "10 Euler steps" in st["text"]
    assert depth_eval.eval_settings("paper", "log", 128, 32)["size"] == (96, 128)   # the tiny prior's training size
    st = depth_eval.eval_settings("paper", "log", 512, 64, steps=4, align="log", limit=5)
    assert st["label"] == "paper+steps4+align-log+limit5" and "not comparable" in st["text"]
    native = depth_eval.eval_settings("native", "log", 512, 64)
    assert native["size"] is None and native["align"] == "log" and native["steps"] == 4 and native["label"] == "native"
    assert depth_eval.eval_settings("native", "affine", 512, 64)["align"] == "depth"   # the space the model predicts
    assert depth_eval.eval_settings("native", "log", 512, 64, eval_res="256x320")["size"] == (256, 320)
    for bad in ("384", "384x500", "axb"):
        with pytest.raises(ValueError, match="--eval-res"):
            depth_eval.eval_settings("paper", "log", 512, 64, eval_res=bad)


def test_the_384x512_resize_and_back_keeps_the_truths_size_and_valid_mask(monkeypatch):
    """Inputs of any size run at 384×512; each fitted map comes back at the truth's size, scored on the
    file's own valid mask; a model that predicts the truth's normalised log depth scores near zero."""
    g = torch.Generator().manual_seed(0)
    items = []
    for h, w in ((352, 1216), (480, 640), (45, 70)):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        depth = (1 + 4 * yy + 2 * xx)[None]
        valid = torch.rand(1, h, w, generator=g) > 0.3
        items.append(dict(rgb=torch.zeros(3, h, w), depth=depth * valid, valid=valid, name=f"{h}x{w}", truth=depth))
    st = depth_eval.eval_settings("paper", "log", 512, 64)
    seen_in, seen_fit = [], []

    def predict(rgb):   # stands in for the model: the truth's normalised log depth, at the processing size
        seen_in.append(tuple(rgb.shape))
        it = items[len(seen_in) - 1]
        x = data.normalize_depth(it["truth"], torch.ones_like(it["valid"]), "log", q=0)[0]
        return depth_eval.resize_to(x[None], st["size"])

    real = depth_eval.evaluate_depth

    def spy(pred, gt, valid, kind, space):
        seen_fit.append((space, tuple(pred.shape), valid))
        return real(pred, gt, valid, kind, space)

    monkeypatch.setattr(depth_eval, "evaluate_depth", spy)
    per = depth_eval.score_images(lambda rgb: predict(depth_eval.resize_to(rgb, st["size"])), items, "rendered",
                                  ("depth", "log"), "log")
    assert seen_in == [(1, 3, 384, 512)] * 3
    assert [f[0] for f in seen_fit] == ["depth", "log"] * 3
    for k, it in enumerate(items):
        for space, shape, valid in seen_fit[2 * k:2 * k + 2]:
            assert shape == tuple(it["depth"].shape[-2:]) and torch.equal(valid, it["valid"][0])
    for space in ("depth", "log"):
        assert [r["name"] for r in per[space]] == ["352x1216", "480x640", "45x70"]
        assert max(r["abs_rel"] for r in per[space]) < 0.01, space   # only the resampling's error is left


def _write_five_sets(root, n=2):
    """Small copies of the five evaluation sets in their real layouts, as `--eval all` expects them:
    <root>/<set>/ with <root>/<set>/<set>_test.txt. KITTI is big enough for its benchmark crop."""
    rng = np.random.default_rng(0)
    sizes = dict(nyu=(48, 64), kitti=(360, 1230), eth3d=(40, 60), scannet=(48, 64), diode=(48, 64))
    for name, (h, w) in sizes.items():
        yy, xx = np.mgrid[0:h, 0:w]
        samples = [dict(rgb=rng.random((h, w, 3)), depth=1.0 + 5.0 * yy / h + 2.0 * xx / w + i,
                        valid=rng.random((h, w)) > 0.1) for i in range(n)]
        split = data.write_depth_set(name, os.path.join(root, name), samples)
        os.replace(split, os.path.join(root, name, depth_eval.DEFAULT_SPLITS[name]))


@pytest.fixture(scope="module")
def tiny_run(tiny_ckpt, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "depth")
    train.main(["--ckpt", tiny_ckpt, "--steps", "1", "--out", run, *FAST])
    return run


def test_eval_all_runs_end_to_end_and_writes_the_table(tiny_ckpt, tiny_run, tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "sets")
    _write_five_sets(root)
    calls, real = [], sample.predict_depth

    def spy(unet, vae, d2f, context, rgb, objective, steps, ensemble, *rest, **kw):
        calls.append((tuple(rgb.shape), steps, ensemble))
        return real(unet, vae, d2f, context, rgb, objective, steps, ensemble, *rest, **kw)

    monkeypatch.setattr(sample, "predict_depth", spy)
    results = sample.main(["--run", tiny_run, "--ckpt", tiny_ckpt, "--eval", "all", "--data-root", root,
                           "--steps", "1", "--ensemble", "2"])
    out, err = capsys.readouterr()
    assert "protocol paper+steps1+ensemble2: every input at 24×32, 1 Euler step, ensemble 2" in out
    assert "img/s" in err                                                # a progress bar per set, images per second
    assert list(results) == list(depth_eval.EVAL_SETS)
    assert calls == [((1, 3, 24, 32), 1, 2)] * 10      # every image of every set at 3:4 of the run's long edge
    stem = os.path.join(tiny_run, "eval_paper+steps1+ensemble2")
    with open(stem + ".json") as f:
        rec = json.load(f)
    with open(stem + ".md") as f:
        md = f.read()
    assert rec["settings"]["size"] == [24, 32] and rec["settings"]["align"] == "depth"
    for name in depth_eval.EVAL_SETS:
        s = rec["sets"][name]
        assert s["images"] == 2 and set(s["metrics"]) == {"depth", "log"}
        assert set(s["metrics"]["depth"]) == set(depth_eval.METRICS)
        assert len(s["per_image"]["depth"]) == 2
        m = s["metrics"]["depth"]
        assert m["abs_rel"] == pytest.approx(np.mean([r["abs_rel"] for r in s["per_image"]["depth"]]))
        assert 0 < m["abs_rel"] < 1 and 0 <= m["delta1"] <= m["delta2"] <= m["delta3"] <= 1
    # the markdown: our row carries the JSON's numbers in %, beside the paper's own row
    ours = next(line for line in md.splitlines() if line.startswith("| **ours (depth-space fit)**"))
    expect = " | ".join(f"{rec['sets'][s]['metrics']['depth']['abs_rel'] * 100:.1f} | "
                        f"{rec['sets'][s]['metrics']['depth']['delta1'] * 100:.1f}" for s in depth_eval.EVAL_SETS)
    assert ours.endswith(expect + " |")
    paper = next(line for line in md.splitlines() if line.startswith("| Diff2Flow (paper)"))
    assert paper.split(" | ")[1:3] == [str(v) for v in depth_eval.PAPER_TABLE2["Diff2Flow (paper)"]["nyu"]]
    assert sum(line.startswith("|---") for line in md.splitlines()) == 2      # two tables
    assert "SILog" in md and no_temp_files(tiny_run)
    # --limit: a quick look, its own file, said to be not comparable; the default protocol is paper's
    sample.main(["--run", tiny_run, "--ckpt", tiny_ckpt, "--eval", "kitti", "--data-root", os.path.join(root, "kitti"),
                 "--limit", "1", "--protocol", "native", "--out", str(tmp_path / "quick")])
    with open(tmp_path / "quick" / "eval_native+limit1_kitti.json") as f:
        quick = json.load(f)
    assert list(quick["sets"]) == ["kitti"] and quick["sets"]["kitti"]["images"] == 1
    assert quick["settings"]["steps"] == 4 and quick["settings"]["align"] == "log" and quick["settings"]["size"] is None


def test_missing_sets_and_files_are_named(tiny_ckpt, tiny_run, tmp_path):
    root = tmp_path / "sets"
    _write_five_sets(str(root), n=1)
    os.rename(root / "scannet", root / "scannet_elsewhere")
    os.remove(root / "diode" / "diode_test.txt")
    args = ["--run", tiny_run, "--ckpt", tiny_ckpt, "--eval", "all", "--data-root", str(root), "--steps", "1"]
    with pytest.raises(FileNotFoundError) as e:
        sample.main(args)
    msg = str(e.value)
    assert str(root / "scannet") in msg and str(root / "diode" / "diode_test.txt") in msg
    assert "<data-root>/<set>/<set>_test.txt" in msg and "nyu:" not in msg and "kitti:" not in msg
    with pytest.raises(ValueError, match="--split names one set's"):
        sample.main(args + ["--split", "x.txt"])
    os.remove(root / "nyu" / data.LAYOUTS["nyu"][0].format(i=0, g=0, s="test"))     # an image the split lists
    with pytest.raises(FileNotFoundError, match="missing file: .*rgb_0000.png"):
        sample.main(["--run", tiny_run, "--ckpt", tiny_ckpt, "--eval", "nyu", "--data-root", str(root / "nyu"), "--steps", "1"])


# --- fd.py: the Fréchet distance in closed form, FID with a TorchScript net, the shipped scene features ----

def test_frechet_distance_closed_form():
    import fd
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
    a, b = torch.rand(6, dtype=torch.float64, generator=g) + 0.1, torch.rand(6, dtype=torch.float64, generator=g) + 0.1
    mu1, mu2 = torch.randn(6, dtype=torch.float64, generator=g), torch.randn(6, dtype=torch.float64, generator=g)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T      # commuting: the root is elementwise
    closed = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert abs(fd.frechet_distance(mu1, s1, mu2, s2) - closed) < 1e-10
    assert abs(fd.frechet_distance(mu1, s1, mu1, s1)) < 1e-10
    # 2x2, not commuting: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (positive eigenvalues)
    c = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    d = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    tr_sqrt = math.sqrt((c @ d).trace().item() + 2 * math.sqrt(torch.linalg.det(c @ d).item()))
    zero = torch.zeros(2, dtype=torch.float64)
    assert fd.frechet_distance(zero, c, zero, d) == pytest.approx((c.trace() + d.trace()).item() - 2 * tr_sqrt, rel=1e-9)
    # from Gaussian features: sample statistics of 200k draws give the same number; a shift by v adds |v|^2
    z1 = torch.randn(200_000, 6, dtype=torch.float64, generator=g) * a.sqrt() @ q.T + mu1
    z2 = torch.randn(200_000, 6, dtype=torch.float64, generator=g) * b.sqrt() @ q.T + mu2
    assert abs(fd.fd_between(z1, z2) - closed) < 0.02 * closed
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    assert fd.fd_between(z1[:500], z1[:500] + v) == pytest.approx(float(v.square().sum()), rel=1e-6)


def test_fid_with_a_torchscript_extractor(tmp_path):
    import fd
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)))
    net.save(str(tmp_path / "feat.pt"))
    features = fd.load_feature_extractor(str(tmp_path / "feat.pt"))
    x = torch.randint(0, 256, (40, 3, 8, 8)).float()
    assert abs(fd.fid(features, x, x)) < 1e-6 and fd.fid(features, x, x.flip(0) * 0.5) > 0.1
    with pytest.raises(FileNotFoundError, match="feature extractor not found"):
        fd.load_feature_extractor(str(tmp_path / "inception.pt"))


def test_shipped_scene_features_see_geometry_and_colour():
    """The bundled feature net (fd.py) puts two disjoint sets of held-out scenes close together, and the
    same scenes far away once blurred (what a washed-out sampler makes) or re-lit (results.py's shift)."""
    import fd
    net = fd.load_features()
    a = data.RenderedDepthDataset.split("heldout", 512, *fd.HW, cache=False)
    b = data.RenderedDepthDataset(2_000_000, 512, *fd.HW, cache=False)     # seeds neither split uses
    xa, xb = (torch.stack([ds[i]["rgb"] for i in range(len(ds))]) for ds in (a, b))
    fa = fd.image_features(net, xa)
    floor = fd.fd_between(fa, fd.image_features(net, xb))
    blurred = torch.nn.functional.avg_pool2d(xb, 3, 1, 1, count_include_pad=False)
    relit = xb * torch.tensor([0.7, 0.7, 0.9]).view(3, 1, 1) - 0.2
    fd_blur, fd_relit = fd.fd_between(fa, fd.image_features(net, blurred)), fd.fd_between(fa, fd.image_features(net, relit))
    print(f"FD of 512 scenes to 512 others {floor:.2f}, blurred {fd_blur:.2f}, re-lit {fd_relit:.2f}")
    assert fd_blur > 2 * floor and fd_relit > 2 * floor      # measured: 5.5, 11.9, 23.8
    # a 96x128 render of the same scenes reads like the 48x64 one (the net resizes its input)
    big = data.RenderedDepthDataset(2_000_000, 64, 96, 128, cache=False)
    fbig = fd.image_features(net, torch.stack([big[i]["rgb"] for i in range(64)]))
    assert (fbig - fd.image_features(net, xb[:64])).norm(dim=1).mean() < 0.5 * (fa[:64] - fa[64:128]).norm(dim=1).mean()


def test_mirror_targets_are_the_targets_of_the_mirrored_image():
    """fd.py trains on mirrored scenes too: their layout targets must be those of the flipped image."""
    import fd
    ds = data.RenderedDepthDataset.split("heldout", 4, *fd.HW, cache=False)
    rgb8 = torch.stack([((ds[i]["rgb"] + 1) * 127.5).round().to(torch.uint8) for i in range(4)])
    dnorm = data.normalize_depth(torch.stack([ds[i]["depth"] for i in range(4)]),
                                 torch.stack([ds[i]["valid"] for i in range(4)]))[0]
    seeds = range(data.HELDOUT_SEED0, data.HELDOUT_SEED0 + 4)
    y, y_flipped = fd.scene_targets(rgb8, dnorm, seeds), fd.scene_targets(rgb8.flip(-1), dnorm.flip(-1), seeds)
    m = fd.mirror_targets(y)
    assert torch.allclose(m[:, :96], y_flipped[:, :96], atol=1e-5) and not torch.allclose(y[:, :96], y_flipped[:, :96])
    assert torch.equal(m[:, fd.ROLL], -y[:, fd.ROLL]) and (y[:, fd.ROLL] != 0).all()


def test_results_hold_only_for_the_prior_they_were_made_from(tmp_path, monkeypatch):
    """results.py skips finished runs by name; after the bundled prior's weights change, its old runs, curves
    and random-weights file must not pass for the new prior's."""
    import results
    from safetensors.torch import save_file
    prior = tmp_path / "prior.safetensors"
    save_file({"w": torch.zeros(3)}, str(prior), metadata={"diff2flow.tiny.command": "one", "diff2flow.res": "16x24"})
    monkeypatch.setattr(results, "TINY_PRIOR", str(prior))
    monkeypatch.setattr(results, "OUT", str(tmp_path / "results"))
    monkeypatch.setattr(results, "RUNS", str(tmp_path / "results" / "runs"))
    caches = (results.prior_stamp, results.prior_hw, results.scenes_stamp)
    for c in caches:
        c.cache_clear()
    results.check_prior()
    results.save_json([[0, 1.5]], "shift-fm-s0.json")
    results.save_json({"a": 1}, "ceiling.json", results.scenes_stamp)
    assert results.load_json("shift-fm-s0.json") == [[0, 1.5]] and results.load_json("none.json") is None
    assert results.load_json("ceiling.json") is None               # stamped with the scenes, not the prior
    save_file({"w": torch.zeros(3)}, str(prior), metadata={"diff2flow.tiny.command": "edited", "diff2flow.res": "16x24"})
    results.prior_stamp.cache_clear()
    assert results.load_json("shift-fm-s0.json") == [[0, 1.5]]    # the same weights: a metadata edit keeps results
    save_file({"w": torch.ones(3)}, str(prior), metadata={"diff2flow.res": "16x24"})
    results.prior_stamp.cache_clear()
    assert results.load_json("shift-fm-s0.json") is None          # remade, not reused
    assert results.load_json("ceiling.json", results.scenes_stamp) == {"a": 1}   # the ceiling never used the prior
    save_file({"w": torch.ones(3)}, str(prior), metadata={"diff2flow.res": "24x32"})
    results.prior_hw.cache_clear(), results.scenes_stamp.cache_clear()
    assert results.load_json("ceiling.json", results.scenes_stamp) is None       # other scenes: remade
    with pytest.raises(SystemExit, match="holds runs of another tiny prior.*delete"):
        results.check_prior()
    for c in caches:
        c.cache_clear()


def test_results_refuse_a_finished_run_made_with_other_settings(tiny_ckpt, tmp_path, monkeypatch):
    """results.py reuses a finished run by name; a run made before one of train.py's defaults changed must
    be refused with the flag and the fix, not taken for today's. Where it was trained does not count."""
    import results
    monkeypatch.setattr(results, "RUNS", str(tmp_path))
    monkeypatch.setattr(train, "TINY_DEPTH_STEPS", 2)
    args = ["--ckpt", tiny_ckpt, "--task", "depth", *FAST]        # --steps left to train.py's default
    results.run_once("r", args, None)
    log = (tmp_path / "r" / train.LOG_FILE).read_text()
    assert [r["step"] for r in results.read_log(str(tmp_path / "r")) if r["kind"] == "report"][-1] == 2
    results.run_once("r", [*args, "--save-every", "1", "--workers", "0"], None)    # reused: nothing trained again
    assert (tmp_path / "r" / train.LOG_FILE).read_text() == log
    assert results.final_report("r", args)[1]["steps"] == 1
    # a table read with other sampling steps than train.py reads it with today (rows written before they
    # said so were read with 2) is refused too: its numbers are not today's protocol
    with pytest.raises(SystemExit, match=r"/r's table at step 0 was read with 1 steps, train.py now reads it with 3"):
        results.final_report("r", [*args, "--report-steps", "3"])
    rows = [json.loads(line) for line in log.splitlines()]
    (tmp_path / "r" / train.LOG_FILE).write_text("".join(json.dumps({k: v for k, v in r.items() if k != "steps"}) + "\n"
                                                        for r in rows))
    with pytest.raises(SystemExit, match=r"read with 2 steps, train.py now reads it with 1 \(--report-steps\)"):
        results.final_report("r", args)
    (tmp_path / "r" / train.LOG_FILE).write_text(log)
    monkeypatch.setattr(train, "TINY_DEPTH_STEPS", 3)             # the default moves on
    with pytest.raises(SystemExit, match=r"/r was trained with --steps 2, train.py now gives 3: delete .*/r to train"):
        results.run_once("r", args, None)
    with pytest.raises(SystemExit, match=r"--lora-rank 4, train.py now gives 8 \(and 1 more: --steps\)"):
        results.run_once("r", [*args, "--lora-rank", "8"], None)
