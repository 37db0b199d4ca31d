"""`lit-spine bench`: the statistics and target logic, the Markdown file, a real --quick run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from lit_spine import bench, sweep
from lit_spine import runs as run_folder
from lit_spine.bench import record as report
from lit_spine.bench import sections, step
from lit_spine.bench.record import Figure, check_target, ratio_record, summarize
from lit_spine.commands import bench as bench_command
from lit_spine.hardware import cpu_bf16_native

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
    "peak_flops/fp32",
    "step/resnet18/fp32",
    "step/resnet18/fp32+cl",
    "step/resnet18/plain_fp32",
}
BF16_FIGURES = {"peak_flops/bf16", "step/resnet18/bf16", "step/resnet18/bf16+cl"}
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
    "step_vs_plain_fp32/resnet18/fp32+cl",
}
# Every section but `sweep`, which starts three `lit-spine fit` processes (its own slow test).
QUICK_SECTIONS = ",".join(s for s in bench.SECTIONS if s != "sweep")


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
    report.write_markdown(out, "## CPU run: first", gpu_run=False)
    text = out.read_text()
    assert "No GPU was available to this run" in text and "## CPU run: first" in text
    gpu_block = f"{report.GPU_BEGIN}\n## GPU run: H100\n\nmeasured {report.GPU_END}"
    out.write_text(text.replace(text[text.index(report.GPU_BEGIN) :], gpu_block))
    report.write_markdown(out, "## CPU run: second", gpu_run=False)
    text = out.read_text()
    assert "## GPU run: H100" in text and "No GPU was available" not in text
    assert "## CPU run: second" in text and "first" not in text


def test_bad_options_fail_clearly(capsys):
    assert bench_command.main(["--only", "metrix"]) == 2
    assert "did you mean 'metric'" in capsys.readouterr().err
    assert bench_command.main(["--image-size", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_quick_run_prints_every_figure_and_writes_markdown(tmp_path, capsys):
    start = time.perf_counter()
    code = bench_command.main(
        [
            "--quick",
            "--only",
            QUICK_SECTIONS,
            "--device",
            "cpu",  # the code path `--device cuda` takes, with the device passed through
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
    if cpu_bf16_native():
        expected |= BF16_FIGURES
    assert names >= expected, sorted(expected - names)
    suite = step.suite_variant(cuda=False).name
    target = next(r for r in records if r["figure"] == f"step_vs_plain_fp32/resnet18/{suite}")
    assert target["target"] == sections.STEP_TARGET and isinstance(target["meets"], bool)
    for r in records:
        if r["figure"].startswith("step/"):
            # achieved FLOP/s = images/s x 3 x forward FLOPs; MFU divides by this run's peak
            assert r["achieved_gflops"] == pytest.approx(
                r["median"] * r["train_gflop_per_image"], rel=1e-3
            )
            assert r["mfu"] > 0 and r["threads"] >= 1, r
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
        "Training step: precision, memory format, MFU",
        "peak_flops/fp32",
    ):
        assert name in md
    assert report.CPU_BEGIN in md and report.GPU_END in md
    saved = json.loads((tmp_path / "b.json").read_text())
    assert {f["figure"] for f in saved["figures"]} >= QUICK_FIGURES
    assert not list((tmp_path / "work").iterdir())  # the temporary phantom is cleaned up
    print(f"quick bench: {seconds:.0f} s")


def test_training_flops_count_the_backward_as_twice_the_forward():
    assert step.train_flops_per_image(1e9) == pytest.approx(3e9)
    assert step.Variant("bf16-mixed", channels_last=True).name == "bf16+cl"
    assert step.Variant().dtype == torch.float32


def test_the_bench_times_the_precision_the_sweep_preset_trains_with():
    suite = step.suite_variant(cuda=False)
    assert suite.channels_last is True  # experiments/sweep_cpu.yaml
    assert suite.precision == ("bf16-mixed" if cpu_bf16_native() else "32-true")
    assert step.suite_variant(cuda=True) == step.Variant("bf16-mixed", channels_last=True)


def test_a_sweep_worker_gets_its_share_of_intra_and_inter_op_threads():
    code = (
        "from lit_spine.hardware import set_cpu_threads; import torch; set_cpu_threads(1); "
        "print(torch.get_num_threads(), torch.get_num_interop_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_sweep_prints_wall_time_and_images_per_s(tmp_path):
    state = sweep.SweepState(
        path=tmp_path / "state.json", sweep_file="s.yaml", name="s", hash="h", config={}
    )
    for i, (status, rate) in enumerate([("finished", 10.0), ("finished", 14.0), ("failed", 99)]):
        run = sweep.PlannedRun(id=f"r{i}", params={}, command=[], run_dir=f"runs/r{i}")
        run.status = status
        (tmp_path / run.run_dir).mkdir(parents=True)
        run_folder.write_summary(tmp_path / run.run_dir, {"status": status, "images_per_s": rate})
        state.runs.append(run)
    line = sweep.throughput_line(state, 125.0)
    assert "wall time 2m05s" in line and "12.0 images/s per run" in line and "2 finished" in line


@pytest.mark.slow
def test_quick_sweep_section_times_the_old_and_the_new_preset(tmp_path, capsys):
    code = bench_command.main(["--quick", "--only", "sweep", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0, out
    records = {json.loads(line)["figure"]: json.loads(line) for line in out.splitlines()
               if line.startswith("{")}  # fmt: skip
    for side in ("sweep_run/old_fp32", "sweep_run/new"):
        assert records[side]["n"] == 1 and records[side]["median"] > 0
        assert records[f"{side}/images_per_s"]["median"] > 0
    speedup = records["sweep_run_speedup"]
    assert speedup["target"] == sections.SWEEP_TARGET and isinstance(speedup["meets"], bool)


def test_the_sweep_bench_reads_the_diagnostics_share_of_a_run(tmp_path):
    """The sweep section reports the Diagnostics callback's share of each fit from the run's
    diagnostics.json (`cost.fraction_of_fit`), NaN where the run wrote none."""
    run = tmp_path / "run"
    run.mkdir()
    assert math.isnan(sections.diagnostics_share(run))
    (run / "diagnostics.json").write_text(json.dumps({"cost": {"fraction_of_fit": 0.025}}))
    assert sections.diagnostics_share(run) == pytest.approx(2.5)
