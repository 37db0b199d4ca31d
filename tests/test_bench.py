"""`lit-spine bench`: the statistics and target logic, the Markdown file, a real --quick run."""

from __future__ import annotations

import json
import math
import time

import pytest

from lit_spine import bench
from lit_spine.bench import Figure, check_target, ratio_record, summarize

QUICK_FIGURES = {
    "phantom_generation",
    "cache_build_files",
    "cache_build_studies",
    "cache_read",
    "dicom_decode",
    "loader_workers0",
    "loader_workers2",
    "metric_score_10k",
    "metric_per_val_epoch",
    "val_forward_per_epoch",
    "train_lightning",
    "train_plain_loop",
    "lightning_run_overhead",
    "grid/mobilenetv3_small_100/batchnorm",
    "grid/mobilenetv3_small_100/groupnorm",
}
ONE_SHOT_FIGURES = {"phantom_dataset"}  # a whole dataset with every core, timed once
QUICK_RATIOS = {
    "phantom_200_studies_target",
    "cache_read_vs_dicom_decode",
    "metric_score_10k_target",
    "metric_vs_val_forward",
    "lightning_vs_plain",
    "grid_cost/mobilenetv3_small_100/groupnorm_vs_batchnorm",
    "loader_vs_fastest_training",
    "loader_workers0_vs_fastest_training",
}


def test_summarize_median_min_max():
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([4.0, 1.0]) == {"median": 2.5, "min": 1.0, "max": 4.0, "n": 2}
    s = summarize([1.0, float("nan"), 5.0])  # a failed repeat does not poison the figure
    assert s["n"] == 2 and s["median"] == 3.0
    assert summarize([])["n"] == 0 and math.isnan(summarize([])["median"])


def test_check_target_directions():
    assert check_target(0.96, 0.95) and check_target(0.95, 0.95)
    assert not check_target(0.94, 0.95)
    assert check_target(0.3, 1.0, higher_is_better=False)
    assert not check_target(1.0, 1.0, higher_is_better=False)
    assert not check_target(float("nan"), 0.0)


def test_ratio_record_uses_medians_and_explains_a_miss():
    fast = Figure("lightning", "images/s", [9.0, 10.0, 30.0])
    slow = Figure("plain", "images/s", [10.0, 12.0, 11.0])
    rec = ratio_record("l_vs_p", fast, slow, 0.95, why="hooks cost time")
    assert rec["ratio"] == pytest.approx(10.0 / 11.0)
    assert rec["meets"] is False and rec["why"] == "hooks cost time"
    assert rec["paired_min"] == pytest.approx(10.0 / 12.0)  # per-repeat pairs: 0.9, 0.83, 2.7
    assert rec["paired_max"] == pytest.approx(30.0 / 11.0)
    ok = ratio_record("l_vs_p", slow, fast, 0.95)
    assert ok["meets"] is True and "why" not in ok
    assert "meets" not in ratio_record("plain ratio", fast, slow)  # no target, no verdict
    assert rec["straddles_target"] is True  # repeats at 0.83 and 2.7 lie on both sides of 0.95
    assert "straddles_target" not in ratio_record("x", fast, slow, 0.5)
    json.dumps(rec)


def test_figure_record_is_json_safe():
    rec = Figure("x", "s", [], extra={"skipped": "time budget"}).record()
    assert rec["median"] is None and rec["n"] == 0
    json.dumps(rec, allow_nan=False)


def test_markdown_keeps_an_earlier_gpu_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    bench.write_markdown(out, "## CPU run: first", gpu_run=False)
    text = out.read_text()
    assert "No GPU was available to this run" in text and "## CPU run: first" in text
    gpu_block = f"{bench.GPU_BEGIN}\n## GPU run: H100\n\nmeasured {bench.GPU_END}"
    out.write_text(text.replace(text[text.index(bench.GPU_BEGIN) :], gpu_block))
    bench.write_markdown(out, "## CPU run: second", gpu_run=False)
    text = out.read_text()
    assert "## GPU run: H100" in text and "No GPU was available" not in text
    assert "## CPU run: second" in text and "first" not in text


def test_bad_options_fail_clearly(capsys):
    assert bench.main(["--only", "metrix"]) == 2
    assert "did you mean 'metric'" in capsys.readouterr().err
    assert bench.main(["--image-size", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_quick_run_prints_every_figure_and_writes_markdown(tmp_path, capsys):
    start = time.perf_counter()
    code = bench.main(
        [
            "--quick",
            "--out",
            str(tmp_path / "B.md"),
            "--json-out",
            str(tmp_path / "b.json"),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0, out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    names = {r["figure"] for r in records}
    expected = QUICK_FIGURES | ONE_SHOT_FIGURES | QUICK_RATIOS
    assert names >= expected, sorted(expected - names)
    for r in records:
        if r["figure"] in QUICK_FIGURES:
            assert r["n"] == 2 and r["min"] <= r["median"] <= r["max"], r
        if "target" in r:
            assert isinstance(r["meets"], bool) and (r["meets"] or r["why"]), r
    grid = next(r for r in records if r["figure"] == "grid/mobilenetv3_small_100/groupnorm")
    assert grid["norm_group_size"] == 8 and grid["peak_mem_mb"] is not None
    assert "lit-spine bench on" in out  # the readable summary follows the JSON lines
    md = (tmp_path / "B.md").read_text()
    for name in (
        "phantom_generation",
        "lightning_vs_plain",
        "loader_vs_fastest_training",
        "metric_score_10k",
        "mobilenetv3_small_100",
        "No GPU was available",
    ):
        assert name in md
    assert bench.CPU_BEGIN in md and bench.GPU_END in md
    saved = json.loads((tmp_path / "b.json").read_text())
    assert {f["figure"] for f in saved["figures"]} >= QUICK_FIGURES
    assert not list((tmp_path / "work").iterdir())  # the temporary phantom is cleaned up
    print(f"quick bench: {seconds:.0f} s")
