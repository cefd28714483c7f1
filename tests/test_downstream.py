"""Training-free downstream tasks: ridge heads, published DINOv2 heads, metrics, and the ``downstream`` stage."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.cli import main
from pipelines.stages.downstream import DownstreamConfig, run
from pipelines.downstream_data import depth_from_order
from reals import ReaLSError
from reals.downstream import (DepthHead, DepthMeter, HeadFitter, RidgeAccumulator, SegmentationHead,
                              SegmentationMeter, area_downsample, load_dinov2_head, predict_from_latents,
                              predict_from_teacher, ridge_fit)
from reals.teachers import build_teacher
from reals.vae import ReaLSVAE, build_vae

def dinov2_seg_head_file(path, width: int, classes: int = 21, seed: int = 0) -> tuple[str, dict]:
    """An mmseg-style checkpoint laid out like DINOv2's *_voc2012_linear_head.pth (BN + conv_seg)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "decode_head.conv_seg.weight": torch.randn(classes, width, 1, 1, generator=g),
        "decode_head.conv_seg.bias": torch.randn(classes, generator=g),
        "decode_head.bn.weight": torch.rand(width, generator=g) + 0.5,
        "decode_head.bn.bias": torch.randn(width, generator=g),
        "decode_head.bn.running_mean": torch.randn(width, generator=g),
        "decode_head.bn.running_var": torch.rand(width, generator=g) + 0.5,
        "decode_head.bn.num_batches_tracked": torch.tensor(100),
    }
    torch.save({"meta": {"mmseg_version": "0.27.0"}, "state_dict": state}, path)
    return str(path), state


# ---------------------------------------------------------------------------------------------------
# Ridge heads
# ---------------------------------------------------------------------------------------------------

def test_ridge_recovers_a_known_linear_map_and_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 12, dtype=torch.float64)
    w_true = torch.randn(3, 12, generator=g, dtype=torch.float64)
    b_true = torch.randn(3, generator=g, dtype=torch.float64)
    y = x @ w_true.T + b_true
    acc = RidgeAccumulator(12, 3)
    for rows in torch.split(torch.arange(3000), 700):  # streamed in uneven batches
        acc.update(x[rows], y[rows])
    w, b = acc.solve(alpha=1e-10)
    assert torch.allclose(w.double(), w_true, atol=1e-4) and torch.allclose(b.double(), b_true, atol=1e-4)

    alpha = 0.5  # a strong penalty: the result is the textbook closed form on centred data, bias unpenalised
    noisy = y + torch.randn(y.shape, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), noisy - noisy.mean(0)
    lam = alpha * torch.trace(xc.T @ xc) / 12
    expected_w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(12, dtype=torch.float64), xc.T @ yc).T
    w, b = ridge_fit(x, noisy, alpha)
    assert torch.allclose(w.double(), expected_w, atol=1e-4)
    assert torch.allclose(b.double(), noisy.mean(0) - x.mean(0) @ expected_w.T, atol=1e-4)
    assert not torch.allclose(expected_w, w_true, atol=1e-2)  # the penalty really shrinks the map


def test_area_downsample_averages_each_cell():
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[:, :, :3] = 1  # three of the four columns of the left cells
    one_hot = F.one_hot(mask, 2).permute(0, 3, 1, 2)
    cells = area_downsample(one_hot, (2, 2))
    assert torch.allclose(cells[0, 1], torch.tensor([[0.75, 0.0], [0.75, 0.0]]))
    assert torch.allclose(cells.sum(1), torch.ones(1, 2, 2))


def test_head_fitter_recovers_patch_rules_for_depth_and_segmentation():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(6, 8, 4, 4, generator=g)
    w_true, b_true = torch.randn(8, generator=g), 0.7
    depth_cells = torch.einsum("bdhw,d->bhw", feats, w_true) + b_true
    depth_pixels = depth_cells.repeat_interleave(4, 1).repeat_interleave(4, 2)  # every patch covers 4x4 pixels
    fitter = HeadFitter("depth", 8, source="constructed")
    fitter.update(feats[:3], depth_pixels[:3])
    fitter.update(feats[3:], depth_pixels[3:])
    head = fitter.solve(alpha=1e-9)
    assert isinstance(head, DepthHead)
    assert torch.allclose(head.proj.weight.flatten(), w_true, atol=1e-3)
    assert torch.allclose(head.predict(feats), depth_cells, atol=1e-3)
    assert head.predict(feats, size=(16, 16)).shape == (6, 16, 16)

    classes = torch.randint(0, 3, (6, 4, 4), generator=g)
    seg_feats = 3 * F.one_hot(classes, 8).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(6, 8, 4, 4, generator=g)
    fitter = HeadFitter("seg", 8, num_classes=3, source="constructed", token_norm=1.0)
    fitter.update(seg_feats, classes.repeat_interleave(4, 1).repeat_interleave(4, 2))
    head = fitter.solve(alpha=1e-6)
    assert isinstance(head, SegmentationHead) and head.num_classes == 3
    assert torch.equal(head.predict(seg_feats), classes)
    assert head.predict(seg_feats, size=(16, 16)).shape == (6, 16, 16)
    with pytest.raises(ReaLSError, match="class 5"):
        fitter.update(seg_feats, torch.full((6, 16, 16), 5))


def test_token_norm_makes_heads_read_directions_as_the_cosine_alignment_does():
    """A head fitted on teacher tokens gives the teacher's answer on any positive rescaling of them."""
    teacher = build_teacher("tiny-dinov2", input_size=56)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    patch, global_token = teacher(images)
    fitter = HeadFitter("seg", teacher.width, num_classes=3, source="teacher", token_norm=1.0)
    fitter.update(patch, torch.randint(0, 3, (4, 32, 32), generator=torch.Generator().manual_seed(3)))
    head = fitter.solve()

    class ScaledTeacherVAE:  # stands in for a VAE whose alignment network predicts 7x the teacher's tokens
        def semantic_features(self, z):
            return 7.0 * patch, 7.0 * global_token

    expected = predict_from_teacher(teacher, head, images, size=(32, 32))
    assert torch.equal(predict_from_latents(ScaledTeacherVAE(), head, torch.zeros(4, 4, 8, 8), (32, 32)), expected)
    raw = HeadFitter("seg", teacher.width, num_classes=3, source="teacher")
    raw.update(patch, torch.randint(0, 3, (4, 32, 32), generator=torch.Generator().manual_seed(3)))
    raw_head = raw.solve()
    assert not torch.equal(raw_head.predict(7.0 * patch, None, (32, 32)), raw_head.predict(patch, None, (32, 32)))


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------

def test_segmentation_metrics_on_constructed_masks():
    truth = torch.zeros(1, 8, 8, dtype=torch.long)
    truth[:, :, :4] = 1  # left half class 1, right half background
    perfect = SegmentationMeter(3)
    perfect.update(truth, truth)
    assert perfect.compute()["miou"] == 1.0 and perfect.compute()["pixel_accuracy"] == 1.0

    pred = torch.zeros_like(truth)
    pred[:, :, :6] = 1  # class 1 spills over a quarter of the image
    meter = SegmentationMeter(5)  # classes 2..4 never occur: they do not count
    meter.update(pred, truth)
    m = meter.compute()
    # class 1: overlap 1/2, union 3/4 -> 2/3; background: overlap 1/4, union 1/2 -> 1/2
    assert m["iou"][:2] == pytest.approx([1 / 2, 2 / 3]) and m["iou"][2:] == [None, None, None]
    assert m["miou"] == pytest.approx(7 / 12)
    assert m["pixel_accuracy"] == pytest.approx(3 / 4)
    with pytest.raises(ReaLSError, match="differ"):
        meter.update(pred, truth[:, :4])


def test_depth_metrics_on_constructed_maps():
    truth = torch.ones(2, 4, 4)
    truth[1] = 2.0
    truth[0, 0, 0] = 0.0  # invalid pixel: ignored
    pred = truth.clone()
    pred[1, :2] = 3.0  # half of the second map off by 1 (ratio 1.5)
    meter = DepthMeter()
    meter.update(pred, truth)
    m = meter.compute()
    assert m["pixels"] == 31
    assert m["rmse"] == pytest.approx((8 / 31) ** 0.5)
    assert m["delta1"] == pytest.approx(23 / 31)
    meter = DepthMeter()
    meter.update(torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 0.5))  # negatives clamp, ratio 500
    assert meter.compute()["delta1"] == 0.0


def test_synthetic_depth_is_positive_and_layers_are_told_apart_by_delta():
    order = np.arange(6, dtype=np.uint8)
    depth = depth_from_order(order)
    assert (depth > 0).all() and (np.diff(depth) < 0).all()  # later shapes are nearer
    meter = DepthMeter()
    meter.update(torch.from_numpy(depth[1:]), torch.from_numpy(depth[:-1]))  # every pixel one layer off
    assert meter.compute()["delta1"] == 0.0


# ---------------------------------------------------------------------------------------------------
# DINOv2 published heads
# ---------------------------------------------------------------------------------------------------

def test_published_head_of_another_width_is_refused_by_name(tmp_path):
    path, _ = dinov2_seg_head_file(tmp_path / "dinov2_vits14_voc2012_linear_head.pth", width=384)
    with pytest.raises(ReaLSError, match=r"dinov2_vits14_voc2012_linear_head\.pth reads 384-d.*teacher tiny-dinov2 "
                                         r"gives 32-d"):
        load_dinov2_head(path, "seg", "tiny-dinov2", 32)
    with pytest.raises(ReaLSError, match="head file not found.*voc2012_linear_head"):
        load_dinov2_head(str(tmp_path / "missing.pth"), "seg", "tiny-dinov2", 32)
    with pytest.raises(ReaLSError, match="no conv_depth.weight"):
        load_dinov2_head(path, "depth", "dinov2_vits14", 384)


def test_published_segmentation_head_folds_its_batchnorm(tmp_path):
    path, state = dinov2_seg_head_file(tmp_path / "dinov2_vitb14_voc2012_linear_head.pth", width=32)
    head = load_dinov2_head(path, "seg", "tiny-dinov2", 32)
    assert head.num_classes == 21 and not head.with_global and "voc2012" in head.source
    patch = torch.randn(2, 32, 3, 3)
    bn = (patch - state["decode_head.bn.running_mean"][:, None, None]) / torch.sqrt(
        state["decode_head.bn.running_var"][:, None, None] + 1e-5)
    bn = bn * state["decode_head.bn.weight"][:, None, None] + state["decode_head.bn.bias"][:, None, None]
    expected = F.conv2d(bn, state["decode_head.conv_seg.weight"], state["decode_head.conv_seg.bias"])
    assert torch.allclose(head(patch), expected, atol=1e-4)


def test_published_depth_head_reads_patch_and_cls_tokens_into_bins(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"decode_head.conv_depth.weight": torch.randn(256, 64, 1, 1, generator=g),
             "decode_head.conv_depth.bias": torch.randn(256, generator=g)}
    for name, top in (("dinov2_vits14_nyu_linear_head.pth", 10.0), ("dinov2_vits14_kitti_linear_head.pth", 80.0)):
        torch.save({"state_dict": state}, tmp_path / name)
        head = load_dinov2_head(str(tmp_path / name), "depth", "tiny-dinov2", 32)
        assert head.with_global and head.bins[-1].item() == pytest.approx(top)
        depth = head.predict(torch.randn(2, 32, 4, 4), torch.randn(2, 32), size=(8, 8))
        assert depth.shape == (2, 8, 8) and bool((depth >= 1e-3).all()) and bool((depth <= top).all())
        with pytest.raises(ReaLSError, match="global token"):
            head.predict(torch.randn(2, 32, 4, 4))


# ---------------------------------------------------------------------------------------------------
# Real and generated latents
# ---------------------------------------------------------------------------------------------------

def test_heads_apply_to_real_and_generated_latents(tiny_vae_dir):
    vae = ReaLSVAE.from_pretrained(tiny_vae_dir)
    seg = SegmentationHead(32, 5, token_norm=1.0)
    depth = DepthHead(32, token_norm=1.0)
    images = torch.rand(2, 3, 32, 32)
    real = vae.normalize(vae.encode(images * 2 - 1)[0])
    generated = torch.randn(3, 4, 8, 8)
    for z in (real, generated):
        labels = predict_from_latents(vae, seg, z, size=(32, 32))
        assert labels.shape == (len(z), 32, 32) and labels.dtype == torch.int64 and int(labels.max()) < 5
        assert predict_from_latents(vae, depth, z, size=(32, 32)).shape == (len(z), 32, 32)
        assert predict_from_latents(vae, seg, z).shape == (len(z), 8, 8)  # on the latent grid
    with pytest.raises(ReaLSError, match="reads 48-d features, but the VAE's alignment network gives 32-d"):
        predict_from_latents(vae, SegmentationHead(48, 5), generated)


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------

def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_stage_end_to_end_on_synthetic_folder(tmp_path, synthetic_root, tiny_vae_dir):
    np.savez(tmp_path / "samples.npz", latents=np.random.default_rng(0).normal(size=(5, 4, 8, 8)).astype(np.float32),
             arr_1=np.arange(5) % 4)
    cfg = DownstreamConfig(tasks=["seg", "depth"], data_path=str(synthetic_root), vae_path=tiny_vae_dir,
                           output=str(tmp_path / "out"), samples=str(tmp_path / "samples.npz"), num_fit=16,
                           num_eval=8, num_overlays=3, show_progress=False)
    s = run(cfg)
    assert (s.fit_images, s.eval_images, s.generated, s.skipped) == (16, 8, 5, [])
    for source in ("teacher", "reals", "baseline"):
        seg, depth = s.metrics["seg"][source], s.metrics["depth"][source]
        assert 0 <= seg["miou"] <= 1 and 0 <= seg["pixel_accuracy"] <= 1 and seg["pixels"] == 8 * 32 * 32
        assert 0 <= depth["rmse"] <= 1 and 0 <= depth["delta1"] <= 1 and depth["pixels"] == 8 * 32 * 32
    assert 0 <= s.agreement["seg"]["miou"] <= 1 and 0 <= s.generated_metrics["seg"]["label_agreement"] <= 1
    assert "no --baseline-vae-path" in s.baseline

    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "| teacher (upper bound) |" in report and "| ReaLS latents (training-free) |" in report
    assert f"{s.metrics['seg']['reals']['miou']:.4f}" in report
    # real: image + (teacher, ReaLS, baseline, truth) per task; generated: image + ReaLS per task
    assert _png_size(out / "overlays_real.png") == (9 * 96, 14 + 3 * 96)
    assert _png_size(out / "overlays_generated.png") == (3 * 96, 14 + 3 * 96)
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["summary"]["metrics"] == json.loads(s.model_dump_json())["metrics"]

    again = run(cfg)
    assert again.reused and again.metrics == s.metrics
    assert not run(cfg.model_copy(update={"num_eval": 6})).reused


def test_stage_on_shards_with_published_head_and_plain_baseline(tmp_path, tiny_shards, synthetic_root, tiny_vae_dir):
    build_vae("tiny").save_pretrained(tmp_path / "plain")  # a plain diffusers AutoencoderKL dir
    head, _ = dinov2_seg_head_file(tmp_path / "dinov2_vits14_voc2012_linear_head.pth", width=32)
    s = run(DownstreamConfig(tasks=["seg"], data_path=tiny_shards, ground_truth=str(synthetic_root),
                             vae_path=tiny_vae_dir, output=str(tmp_path / "out"), seg_head=head,
                             baseline_vae_path=str(tmp_path / "plain"), num_fit=12, num_eval=12, num_overlays=2,
                             show_progress=False))
    assert (s.fit_images, s.eval_images, s.skipped) == (12, 12, [])  # every shard sample found its mask
    assert list(s.metrics["seg"]) == ["baseline"]  # VOC classes are not the dataset's: agreement only
    assert 0 <= s.metrics["seg"]["baseline"]["miou"] <= 1 and 0 <= s.agreement["seg"]["pixel_accuracy"] <= 1
    assert "raw (un-normalised) posterior-mean latents" in s.baseline and "voc2012" in s.heads["seg"]


def test_cli_reports_bad_inputs_in_one_line(tmp_path, synthetic_root, tiny_shards, tiny_vae_dir, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    base = ["downstream", "seg", "--vae-path", tiny_vae_dir, "--output", str(tmp_path / "out")]
    cases = [
        (["--data-path", str(synthetic_root), "--samples", str(tmp_path / "bad.npy")],
         r"latents have shape \(2, 3, 8, 8\).*4 latent channels"),
        (["--data-path", tiny_shards], "no ground truth to fit the seg head: give --ground-truth"),
        (["--data-path", str(tmp_path / "nowhere")], "neither shards"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert re.search(message, err), err


def test_overlay_png_is_readable_by_plain_pillow(tmp_path):
    from pipelines.render import compose, overlay_rows

    images = np.zeros((2, 16, 16, 3), np.uint8)
    seg = np.ones((2, 16, 16), np.int64)
    depth = np.linspace(0.2, 1, 2 * 16 * 16).reshape(2, 16, 16)
    rows = overlay_rows(images, [("seg", "seg", seg), ("depth", "depth", depth)])
    png = compose(rows, ["image", "seg", "depth"], panel=32)
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (96, 14 + 64)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels[14:46, 32:64].any()  # foreground class coloured over the black image
