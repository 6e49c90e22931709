"""Depth evaluation: Marigold's metrics on hand-made cases, the paper's protocol (depth-space fit, 384×512
and back), and `sample.py --eval all` end to end on small written copies of the five evaluation sets."""
import math

import pytest
import torch

import data


# --- metrics: each one on arrays small enough to compute by hand --------------------------------------

def test_each_metric_on_a_hand_made_case():
    ratios = [1.0, 1.2, 1.4, 1.8, 3.0]            # p / g; truth 2 m everywhere, so g² != g (SqRel divides by g)
    gt, pred = torch.full((5,), 2.0), torch.tensor([2 * r for r in ratios])
    m = data.depth_metrics(pred, gt, torch.ones(5, dtype=torch.bool))
    assert set(m) == set(data.METRICS)
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
    m = data.depth_metrics(pred, gt, valid)
    assert m["abs_rel"] == pytest.approx(0.5) and m["rmse_log"] == pytest.approx(math.log(1.5))
    assert m["silog"] == pytest.approx(0, abs=1e-6)              # scale-invariant: a pure scale error is 0
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 + 1 + 4) / 3))
    assert m["i_rmse"] == pytest.approx(math.sqrt(sum((1 / (1.5 * g) - 1 / g) ** 2 for g in (1, 2, 4)) / 3))
    assert (m["delta1"], m["delta2"]) == (0.0, 1.0)              # 1.5 is outside 1.25, inside 1.5625
    with pytest.raises(ValueError, match="must be > 0"):
        data.depth_metrics(torch.zeros(2, 2), gt, valid)
    with pytest.raises(ValueError, match="no valid"):
        data.depth_metrics(pred, gt, torch.zeros(2, 2, dtype=torch.bool))


def test_prediction_to_depth_is_depthfm_exp_then_min_max():
    x = torch.tensor([[[-1.0, 0.0], [0.5, 1.0]]])                    # (1, 2, 2), near = -1
    d = data.prediction_to_depth(x, "log")
    e = torch.exp(x.double())
    expect = (e - e.min()) / (e.max() - e.min())
    torch.testing.assert_close(d.double(), expect)
    assert d.dtype == x.dtype and d.min() == 0 and d.max() == 1 and d[0, 0, 0] == 0     # near stays 0
    torch.testing.assert_close(data.prediction_to_depth(x, "affine"), (x + 1) / 2)   # affine: min-max only
    assert data.prediction_to_depth(torch.ones(1, 3, 3), "log").abs().max() == 0      # constant: 0, not nan
    two = data.prediction_to_depth(torch.stack([x[0], 3 * x[0]]), "log")           # per image, not per batch
    assert two[1].min() == 0 and two[1].max() == 1
    with pytest.raises(ValueError, match="normalisation 'metric'"):
        data.prediction_to_depth(x, "metric")


def test_an_affine_map_of_the_truth_scores_zero_error_in_depth_space():
    g = torch.Generator().manual_seed(0)
    gt = 0.5 + 9 * torch.rand(24, 32, generator=g, dtype=torch.float64)
    valid = torch.rand(24, 32, generator=g) > 0.2
    pred = torch.where(valid, 0.3 * gt + 1.7, torch.tensor(-50.0, dtype=torch.float64))   # invalid pixels wild
    r = data.evaluate_depth(pred, gt, valid, "nyu", "depth")
    assert r["scale"] == pytest.approx(1 / 0.3) and r["shift"] == pytest.approx(-1.7 / 0.3)
    for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "i_rmse", "silog"):
        assert r[k] == pytest.approx(0, abs=1e-9), k
    assert r["delta1"] == r["delta2"] == r["delta3"] == 1.0
    # through the paper's chain: a log-model output whose exp is affine in depth (exp x = 0.2 g + 1) is
    # exact after DepthFM's exp + min-max and the depth-space fit; the log-space fit of the same x is not
    x = torch.log(0.2 * gt + 1)
    r = data.evaluate_depth(data.prediction_to_depth(x, "log"), gt, valid, "nyu", "depth")
    assert r["abs_rel"] < 1e-9 and r["silog"] < 1e-5
    assert data.evaluate_depth(x, gt, valid, "nyu", "log")["abs_rel"] > 0.01
