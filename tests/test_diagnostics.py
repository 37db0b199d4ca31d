"""Diagnostics: constructed cases with known answers, then one real tiny fit logged to W&B
offline whose run files, diagnostics.json and report sections are read back."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from spine_helpers import write_diagnostics
from torch import nn

from lit_spine import diagnostics
from lit_spine.data.labels import DISC_POINTS, NUM_POINTS, POINT_NAMES, get_vocabulary
from lit_spine.models.summary import receptive_field
from lit_spine.report_diagnostics import SECTIONS, fmt, interval, render_sections

ROOT = Path(__file__).resolve().parents[1]
VOCAB = get_vocabulary("tianchi2020")


def spine_points(n: int, spacing_mm: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """n studies of 11 points stacked 20 px apart (10 mm), with per-study jitter."""
    rng = np.random.default_rng(0)
    y = 40.0 + 20.0 * np.arange(NUM_POINTS)[None, :] + rng.normal(0, 1, (n, NUM_POINTS))
    x = 100.0 + rng.normal(0, 2, (n, NUM_POINTS))
    return np.stack([x, y], -1), np.full((n, 2), spacing_mm)


def test_exact_points_give_zero_radial_error_and_full_hits():
    gt, spacing = spine_points(5)
    present = np.ones(gt.shape[:2], bool)
    assert np.allclose(diagnostics.radial_errors_mm(gt, gt, spacing, present), 0.0)
    result = diagnostics.per_level_localisation(gt, gt, present, spacing, radius_mm=8.0)
    assert result["hit_rate"] == 1.0 and result["off_by_one_rate"] == 0.0
    assert [lv["name"] for lv in result["levels"]] == list(POINT_NAMES)
    assert all(lv["mre_mm"] == 0.0 and lv["hit_rate"] == 1.0 for lv in result["levels"])


def test_radial_error_uses_row_and_column_spacing():
    gt = np.zeros((1, 1, 2))
    pred = np.array([[[3.0, 4.0]]])  # dx = 3 columns, dy = 4 rows
    spacing = np.array([[2.0, 1.0]])  # 2 mm per row, 1 mm per column
    errors = diagnostics.radial_errors_mm(pred, gt, spacing, np.ones((1, 1), bool))
    assert errors[0, 0] == pytest.approx(np.hypot(3.0, 8.0))


def test_shift_by_one_level_is_all_off_by_one():
    gt, spacing = spine_points(4)
    present = np.ones(gt.shape[:2], bool)
    neighbours = diagnostics.neighbour_levels()
    # Same-type neighbours only: the disc above/below a disc, the vertebra above/below one.
    assert neighbours[POINT_NAMES.index("L4-L5")] == (
        POINT_NAMES.index("L3-L4"),
        POINT_NAMES.index("L5-S1"),
    )
    assert neighbours[POINT_NAMES.index("L1")] == (POINT_NAMES.index("L2"),)
    # Every prediction sits on the next level down (the lowest of each type on the one above).
    pred = gt[:, [nb[-1] for nb in neighbours]]
    result = diagnostics.per_level_localisation(pred, gt, present, spacing, radius_mm=8.0)
    assert result["off_by_one_rate"] == 1.0 and result["hit_rate"] == 0.0
    assert all(lv["off_by_one_rate"] == 1.0 for lv in result["levels"])
    # A prediction far from every point is a miss but not a level shift.
    far = gt + np.array([60.0, 0.0])
    assert (
        diagnostics.per_level_localisation(far, gt, present, spacing, 8.0)["off_by_one_rate"] == 0.0
    )


def test_calibrated_toy_classifier_has_near_zero_ece_and_bins_agree_with_torchmetrics():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    outcome = rng.random(p.size) < p  # calibrated by construction
    cal = diagnostics.calibration(p, outcome, n_bins=15)
    assert cal["ece"] < 0.01
    overconfident = diagnostics.calibration(np.clip(p * 1.6 - 0.3, 0, 1), outcome, n_bins=15)
    assert overconfident["ece"] > 0.08  # E|0.6 p - 0.3| over the unclipped range: ~0.096
    for result in (cal, overconfident):
        bins = [b for b in result["bins"] if b["n"]]
        ece = sum(b["n"] * abs(b["confidence"] - b["accuracy"]) for b in bins) / result["n"]
        assert ece == pytest.approx(result["ece"], abs=1e-4)
        assert sum(b["n"] for b in result["bins"]) == p.size


def _data(n: int, multi_label: bool = True) -> dict:
    """Collected arrays of n studies with exact points and probabilities equal to the labels."""
    gt, spacing = spine_points(n)
    rng = np.random.default_rng(1)
    k_max = max(len(VOCAB.vertebra), len(VOCAB.disc))
    labels = np.zeros((n, NUM_POINTS, k_max), bool)
    for k in range(NUM_POINTS):
        codes = len(VOCAB.disc) if k in DISC_POINTS else len(VOCAB.vertebra)
        labels[np.arange(n), k, rng.integers(0, codes, n)] = True
    vert = [k for k in range(NUM_POINTS) if k not in DISC_POINTS]
    return {
        "points": gt.astype(np.float32),
        "scores": np.full((n, NUM_POINTS), 0.9, np.float32),
        "vertebra_probs": labels[:, vert, : len(VOCAB.vertebra)].astype(np.float32),
        "disc_probs": labels[:, list(DISC_POINTS), : len(VOCAB.disc)].astype(np.float32),
        "gt_points": gt.astype(np.float32),
        "present": np.ones((n, NUM_POINTS), bool),
        "labels": labels,
        "spacing_mm": spacing.astype(np.float32),
    }


def test_score_at_true_points_separates_localisation_from_classification():
    data = _data(6)
    data["true_vertebra_probs"] = data["vertebra_probs"]
    data["true_disc_probs"] = data["disc_probs"]
    assert diagnostics.score(data, VOCAB, 8.0).map == pytest.approx(1.0)
    # Move every decoded point 30 mm away: the pipeline's mAP collapses, the classifier's
    # mAP at the true points does not.
    data["points"] = data["points"] + np.float32(60.0)
    assert diagnostics.score(data, VOCAB, 8.0).map == 0.0
    assert diagnostics.score(data, VOCAB, 8.0, true_points=True).map == pytest.approx(1.0)
    # Per-level AP only sees that level's rows and ground truth.
    assert diagnostics.score(data, VOCAB, 8.0, true_points=True, level=3).map == pytest.approx(1.0)


def test_calibration_pairs_follow_the_head():
    data = _data(3)
    conf, outcome = diagnostics.calibration_pairs(data, multi_label=True)
    per_study = 5 * len(VOCAB.vertebra) + 6 * len(VOCAB.disc)
    assert len(conf) == 3 * per_study and np.array_equal(conf, outcome.astype(float))
    conf, outcome = diagnostics.calibration_pairs(data, multi_label=False)
    assert len(conf) == 3 * NUM_POINTS and conf.min() == 1.0 and outcome.all()


def test_batchnorm_drift_is_zero_when_batch_stats_equal_running_stats():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    x = torch.randn(8, 4, 6, 6) * 3 + 2
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    net = nn.Sequential(bn)
    with diagnostics.BatchNormDrift(net) as drift:
        net(x)
    layer = drift.result()["0"]
    assert layer["mean_shift_sd"] == pytest.approx(0.0, abs=1e-5)
    assert layer["log_var_ratio"] == pytest.approx(0.0, abs=1e-5)
    # Shift the running mean by one running standard deviation: drift reads 1.
    bn.running_mean.add_(bn.running_var.sqrt())
    with diagnostics.BatchNormDrift(net) as drift:
        net(x)
    assert drift.result()["0"]["mean_shift_sd"] == pytest.approx(1.0, rel=1e-3)


def test_batch_statistics_copy_uses_batch_stats_and_leaves_running_stats():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(5.0)
    net = nn.Sequential(bn)
    twin = diagnostics.batch_statistics_copy(net)
    x = torch.randn(4, 3, 5, 5)
    before = twin[0].running_mean.clone()
    y = twin(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)  # batch-normalised
    assert torch.equal(twin[0].running_mean, before) and not net[0].training
    assert not torch.allclose(net(x).mean((0, 2, 3)), torch.zeros(3), atol=1e-2)


def test_erf_of_a_single_conv_is_its_kernel_support():
    conv = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    images = torch.zeros(3, 1, 33, 33)
    images[:, :, 16, 16] = 1.0
    erf = diagnostics.effective_receptive_field(conv, images, stride=1)
    assert erf.shape == (65, 65) and erf.sum() == pytest.approx(1.0)
    size = diagnostics.erf_size(erf)
    assert size["support_px"] == [5, 5]
    assert size["support_px"] == list(receptive_field(conv, images[:1])["size"])
    # Uniform 5x5 mass: radius 2 holds 13 of 25 px (>= 50%), sqrt(5) only 21 (< 90%), sqrt(8) all.
    assert size["r50_px"] == pytest.approx(2.0) and size["r90_px"] == pytest.approx(np.sqrt(8))
    assert diagnostics.erf_size(erf, (2.0, 2.0))["r50_mm"] == pytest.approx(4.0)


def test_erf_keeps_the_gradient_of_an_off_centre_peak():
    """A peak in the corner whose gradient covers the whole image: the map keeps all of it
    (a window of half the image around the peak kept a quarter, and the sum-1 scaling hid it)."""

    def fn(x):  # every heatmap pixel sums the image; a ramp puts the peak at pixel (0, 0)
        ramp = -torch.arange(24 * 24, dtype=x.dtype).reshape(1, 1, 24, 24) * 1e-3
        return x.sum((1, 2, 3)).reshape(-1, 1, 1, 1) + ramp

    erf = diagnostics.effective_receptive_field(fn, torch.rand(2, 1, 24, 24), stride=1)
    assert erf.shape == (47, 47)
    assert diagnostics.erf_size(erf)["support_px"] == [24, 24]


def test_reliability_bins_reproduce_the_ece_at_edges_and_at_one():
    """torchmetrics bins [low, high) and gives exactly 1.0 a bin of its own; the diagram's
    bins must reproduce its ECE also for saturated probabilities and values on a bin edge."""
    conf = np.array([1.0] * 10 + [0.95] * 10 + [0.4] * 6 + [0.3] * 4, dtype=np.float32)
    outcome = np.array([1] * 5 + [0] * 5 + [1] * 6 + [0] * 4 + [1] * 3 + [0] * 3 + [0] * 4, bool)
    cal = diagnostics.calibration(conf, outcome, n_bins=10)
    n = sum(b["n"] for b in cal["bins"])
    from_bins = sum(
        b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in cal["bins"] if b["n"]
    )
    assert n == len(conf) and from_bins == pytest.approx(cal["ece"], abs=1e-6)
    assert cal["bins"][-1]["low"] == cal["bins"][-1]["high"] == 1.0 and cal["bins"][-1]["n"] == 10
    assert next(b for b in cal["bins"] if b["n"] == 6)["low"] == pytest.approx(0.4)


def test_interval_helper_and_format():
    s = interval([1.0, 2.0, 3.0, None, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    assert s["ci_low"] < 2.0 < s["ci_high"]
    assert fmt([0.5]) == "0.500" and fmt([None]) == "n/a"
    assert fmt([1.0, 2.0, 3.0], 1).startswith("2.0 [")


# ---------------------------------------------------------------------------- real fit + W&B
def wandb_records(path: Path) -> list:
    """Records of a .wandb transaction log (LevelDB log format: 7-byte ':W&B' header, 32 KiB
    blocks, chunks with crc32/length/type headers). wandb 0.31 ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def finished_wandb_records(path: Path, timeout_s: float = 60.0) -> list:
    """The log's records once W&B has written its exit record (the writer flushes late)."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    records: list = []
    while time.monotonic() < deadline:
        try:
            records = wandb_records(path)
        except (AssertionError, DecodeError):  # empty or mid-write
            records = []
        if any(r.HasField("exit") for r in records):
            break
        time.sleep(0.5)
    return records


def _keys(items) -> set[str]:
    return {"/".join([i.key] if i.key else list(i.nested_key)) for i in items}


def test_tiny_fit_writes_diagnostics_logs_wandb_and_renders_report(
    phantom_root, tmp_path, monkeypatch, capsys
):
    import wandb

    from lit_spine.report import write_report
    from lit_spine.train_cli import run_lightning_cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run_lightning_cli(
        [
            "fit", "--config", str(ROOT / "experiments" / "smoke.yaml"),
            f"--data.data_root={phantom_root}", "--data.train_split=train",
            "--data.val_split=val", "--data.test_split=test", "--data.image_size=64",
            "--data.batch_size=2", "--data.num_workers=0",
            f"--data.cache_dir={tmp_path.parent / 'cache'}", "--trainer.accelerator=cpu",
            "--trainer.devices=1", "--trainer.enable_progress_bar=false",
            "--model.net.init_args.backbone=test_resnet", "--model.net.init_args.norm_groups=8",
            "--trainer.max_epochs=2", "--trainer.num_sanity_val_steps=0",
            f"--run_dir={run_dir}", "--wandb=offline",
            "--diagnostics.overlay_every_n_epochs=1", "--diagnostics.overlay_studies=2",
            "--diagnostics.train_batches=2",
        ]
    )  # fmt: skip
    wandb.finish()
    assert "lit-spine: diagnostics in" in capsys.readouterr().out

    diag = json.loads((run_dir / "diagnostics.json").read_text())
    assert diag["weights"].startswith("best checkpoint") and diag["norm"] == "batchnorm"
    lvc = diag["localisation_vs_classification"]
    assert lvc["map_true_points"] is not None and lvc["map_decoded"] is not None
    assert [lv["name"] for lv in diag["per_level"]["levels"]] == list(POINT_NAMES)
    assert diag["generalisation"]["train"]["n_studies"] == 4
    bn = diag["batchnorm"]
    assert bn["has_batchnorm"] and bn["layers"] and bn["mean_shift_sd"] > 0
    assert 0 <= diag["calibration"]["ece"] <= 1 and diag["calibration"]["n"] > 0
    erf = diag["erf"]
    assert erf["theoretical_px"] and erf["init"]["r50_px"] > 0 and erf["trained"]["r90_px"] > 0
    assert diag["cost"]["seconds"] > 0 and diag["cost"]["fraction_of_fit"] > 0
    for png in diag["plots"].values():
        assert (run_dir / png).stat().st_size > 5000

    # W&B offline run: overlays (images), tables and summary fields with define_metric.
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_wandb_records(log)
    assert any(r.HasField("exit") for r in records), f"{log}: W&B never finished the run"
    history = set().union(*(_keys(r.history.item) for r in records if r.HasField("history")))
    summary = set().union(*(_keys(r.summary.update) for r in records if r.HasField("summary")))
    metrics = {r.metric.name for r in records if r.HasField("metric")}
    assert "val/overlays/_type" in history and "diagnostics/per_level/_type" in history
    assert "diagnostics/summary/_type" in history
    for key in ("diagnostics/calibration/ece", "diagnostics/per_level/off_by_one_rate",
                "diagnostics/localisation_vs_classification/map_true_points",
                "diagnostics/batchnorm/mean_shift_sd", "diagnostics/erf/trained_r50_px"):  # fmt: skip
        assert key in summary and key in metrics, key
    media = run_dir.glob("wandb/offline-run-*/files/media")
    files = {p.suffix for m in media for p in m.rglob("*") if p.is_file()}
    assert {".png", ".json"} <= files

    # The report renders the six sections from the run folder and writes their plots.
    report = write_report([run_dir], out=tmp_path / "report")
    for name in SECTIONS:
        assert f"\n## {name}\n" in report.markdown
    for png in ("diagnostics_per_level.png", "diagnostics_reliability.png", "diagnostics_erf.png"):
        assert f"]({png})" in report.markdown and (tmp_path / "report" / png).is_file()


def test_report_sections_aggregate_cells_over_seeds(tmp_path):
    class Run:
        def __init__(self, d):
            self.dir = d

    class Cell:
        def __init__(self, name, runs):
            self.name, self.runs = name, runs

    def write(d: Path, ece: float, drift: float | None, has_bn: bool) -> Path:
        return write_diagnostics(
            d, POINT_NAMES, hit_rate=1.0, ap=0.5, norm="batchnorm" if has_bn else "groupnorm",
            batchnorm={"has_batchnorm": has_bn, "map_eval": 0.2, "map_batch_stats": 0.1,
                "map_gap": 0.1, "mean_shift_sd": drift, "log_var_ratio": drift},
            calibration={"ece": ece, "n": 10, "kind": "k",
                "bins": [{"n": 10, "confidence": 0.5, "accuracy": 0.5 - ece}]},
        )  # fmt: skip

    bn = Cell(
        "norm=batchnorm",
        [Run(write(tmp_path / f"bn{s}", 0.1 + 0.1 * s, 0.5, True)) for s in range(2)],
    )
    gn = Cell("norm=groupnorm", [Run(write(tmp_path / f"gn{s}", 0.05, None, False)) for s in range(2)])  # fmt: skip
    md = render_sections([bn, gn], lambda c: c.name, tmp_path)
    # Mean 0.15, std 0.0707, t(1) 95% half-width 12.706 * 0.05 = 0.635: [-0.485, 0.785], and
    # an ECE cannot be negative, so the report cuts the interval at 0.
    assert "| norm=batchnorm | 2 | 0.150 [0.000, 0.785] |" in md
    assert "| norm=groupnorm | groupnorm | 2 | 0.200 [0.200, 0.200] | 0.100" in md
    gn_row = next(
        line for line in md.splitlines() if line.startswith("| norm=groupnorm | groupnorm")
    )
    assert gn_row.endswith("| n/a | n/a |")
    assert "| L5-S1 | 11.00 [11.00, 11.00] |" in md
    assert all(f"## {name}" in md for name in SECTIONS)
    assert (tmp_path / "diagnostics_reliability.png").is_file()
    empty = render_sections([Cell("x", [Run(tmp_path / "nothing")])], lambda c: c.name, tmp_path)
    assert all(f"## {name}" in empty for name in SECTIONS) and "No run has" in empty
    # A cell whose runs have no diagnostics.json, and a run of a cell missing one, are named.
    bare = Cell("norm=layernorm", [Run(tmp_path / "ln0"), Run(tmp_path / "ln1")])
    part = Cell("norm=batchnorm", [*bn.runs, Run(tmp_path / "bn_bare")])
    md = render_sections([part, gn, bare], lambda c: c.name, tmp_path)
    assert (
        "Runs without a diagnostics.json are left out of these sections (diagnostics off, or "
        "the run predates them): norm=batchnorm: 1 of 3 runs (bn_bare); norm=layernorm: no "
        "run (ln0, ln1)." in md
    )


def test_run_diagnostics_groupnorm_softmax_without_a_trainer(phantom_root, tmp_path):
    """No BatchNorm: batch-stat metric equals eval metric, drift n/a; softmax head: top-label ECE."""
    from torch.utils.data import DataLoader

    from lit_spine.data.datamodule import SpineDataModule
    from lit_spine.diagnostics import run_diagnostics
    from lit_spine.losses import SpineLoss
    from lit_spine.models import SpineNet

    torch.manual_seed(0)
    dm = SpineDataModule(
        data_root=str(phantom_root), image_size=64, batch_size=2, num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.setup("fit")
    net = SpineNet("test_resnet", norm="groupnorm", norm_groups=8)
    loader = DataLoader(dm.val_dataset, batch_size=2)
    result, maps = run_diagnostics(
        net, loader, DataLoader(dm.val_dataset, batch_size=2), vocab=VOCAB, multi_label=False,
        loss_fn=SpineLoss(class_loss="ce", multi_label=False), erf_images=2,
    )  # fmt: skip
    bn = result["batchnorm"]
    assert not bn["has_batchnorm"] and bn["mean_shift_sd"] is None and bn["layers"] == {}
    assert bn["map_batch_stats"] == bn["map_eval"] and bn["map_gap"] == 0.0
    cal = result["calibration"]
    assert (
        cal["kind"].startswith("top softmax")
        # One (top probability, correct) pair per present point of the split.
        and cal["n"] == sum(int(item["present"].sum()) for item in dm.val_dataset)
    )
    # The same split on both sides: no generalisation gap.
    assert result["generalisation"]["gap"]["loss"] == pytest.approx(0.0, abs=1e-6)
    assert maps["trained"].shape == (127, 127) and "init" not in maps
    assert set(result["erf"]["trained"]) >= {"r50_px", "r90_px", "r50_mm", "r90_mm"}


def test_report_intervals_stay_inside_the_quantitys_range():
    """A t-interval of three seeds of a rate can pass 1 (or an error below 0); the report cuts
    it at the range and says so, and leaves signed differences alone."""
    from lit_spine import report_diagnostics as rd

    rates = [0.2, 1.0, 1.0]  # mean 0.733, t-interval about [-0.41, 1.88]
    low, high = rd.interval(rates)["ci_low"], rd.interval(rates)["ci_high"]
    assert low < 0 and high > 1
    assert rd.fmt(rates, bounds=rd.UNIT) == "0.733 [0.000, 1.000]"
    errors = [0.5, 9.0, 0.5]
    assert rd.fmt(errors, 2, bounds=rd.NONNEG).startswith("3.33 [0.00, ")
    assert rd.fmt([-0.5, 0.4, 0.1]) == rd.fmt([-0.5, 0.4, 0.1], bounds=(-math.inf, math.inf))
    assert "cut to the quantity's range" in rd.INTERVAL_NOTE
