"""docs/: the files the code cites exist, and the worked examples of docs/metric.md hold."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lit_spine.metrics import GroundTruthArrays, PredictionArrays, score_detections
from lit_spine.task import POINT_INDEX, get_vocabulary

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "data-format.md", "metric.md", "phantom.md", "regularizers.md")
DOCS += ("architecture.md",)


def _sources() -> list[Path]:
    return sorted([*(ROOT / "lit_spine").rglob("*.py"), *(ROOT / "tests").rglob("*.py")])


def test_every_doc_exists_and_the_index_links_it():
    index = (ROOT / "docs" / "README.md").read_text()
    for name in DOCS:
        assert (ROOT / "docs" / name).is_file(), name
        if name != "README.md":
            assert f"({name})" in index, f"docs/README.md does not link {name}"
    assert "docs/README.md" in (ROOT / "README.md").read_text()


def test_cited_docs_exist_and_nothing_cites_spec():
    cited, spec = set(), set()
    for path in _sources():
        text = path.read_text()
        cited.update(re.findall(r"docs/[\w-]+\.md", text))
        if re.search(r"\bspec/[\w-]+\.md", text):
            spec.add(path.relative_to(ROOT).as_posix())
    assert cited, "no source file cites docs/ (the scan is broken)"
    assert {c for c in cited if not (ROOT / c).is_file()} == set()
    assert spec - {"tests/test_docs.py"} == set()


def _arrays(gt_points, pred_rows, vocab):
    """Flat arrays from (study, point, [x, y], classes) and (study, point, [x, y], class, score)."""
    index = {c: i for i, c in enumerate(vocab.classes)}
    labels = np.zeros((len(gt_points), vocab.num_classes), bool)
    for row, (*_, classes) in enumerate(gt_points):
        labels[row, [index[c] for c in classes]] = True
    gt = GroundTruthArrays(
        np.array([g[0] for g in gt_points]),
        np.array([POINT_INDEX[g[1]] for g in gt_points]),
        np.array([g[2] for g in gt_points], float),
        labels,
    )
    pred = PredictionArrays(
        np.array([p[0] for p in pred_rows]),
        np.array([POINT_INDEX[p[1]] for p in pred_rows]),
        np.array([index[p[3]] for p in pred_rows]),
        np.array([p[2] for p in pred_rows], float),
        np.array([p[4] for p in pred_rows], float),
    )
    return gt, pred


def test_metric_doc_worked_example_1():
    vocab = get_vocabulary("tianchi2020")
    gt, pred = _arrays(
        [
            (0, "L1", (100, 100), ["vertebra/v2"]),
            (0, "L4-L5", (100, 200), ["disc/v2", "disc/v5"]),
            (0, "L5-S1", (110, 230), ["disc/v1"]),
        ],
        [
            (0, "L1", (105, 104), "vertebra/v2", 0.9),
            (0, "L4-L5", (103, 208), "disc/v2", 0.8),
            (0, "L4-L5", (103, 208), "disc/v3", 0.3),
            (0, "L5-S1", (110, 250), "disc/v1", 0.7),
        ],
        vocab,
    )
    r = score_detections(gt, pred, np.array([[0.5, 0.8]]), vocab)
    assert (r.tp, r.fp, r.fn) == (2, 2, 2)
    assert r.precision == r.recall == r.f1 == 0.5
    assert {k: c.ap for k, c in r.classes.items()} == {
        "vertebra/v1": None,
        "vertebra/v2": 1.0,
        "disc/v1": 0.0,
        "disc/v2": 1.0,
        "disc/v3": None,
        "disc/v4": None,
        "disc/v5": 0.0,
    }
    assert r.map == 0.5
    assert r.classes["disc/v2"].baseline_f1 == pytest.approx(2 / 3)
    assert r.baseline_macro_f1 == pytest.approx((1 + 2 / 3) / 4)
    assert round(r.baseline_macro_f1, 4) == 0.4167 and r.keypoint_recall == 0.75
    loc = r.localisation
    assert loc["all"].mre_mm == pytest.approx((20**0.5 + 21.76**0.5 + 10) / 3)
    assert round(loc["all"].mre_mm, 2) == 6.38 and round(loc["all"].median_re_mm, 2) == 4.66
    assert loc["all"].sdr == pytest.approx({2.0: 0.0, 4.0: 0.0, 6.0: 2 / 3, 8.0: 2 / 3})
    assert round(loc["vertebra"].mre_mm, 2) == 4.47 and round(loc["disc"].mre_mm, 2) == 7.33


def test_metric_doc_worked_example_2():
    vocab = get_vocabulary("tianchi2020")
    gt, pred = _arrays(
        [(0, "L3-L4", (50, 50), ["disc/v2"]), (1, "L3-L4", (60, 60), ["disc/v2"])],
        [
            (0, "L4-L5", (50, 90), "disc/v2", 0.9),
            (0, "L3-L4", (52, 50), "disc/v2", 0.8),
            (0, "L3-L4", (55, 50), "disc/v2", 0.7),
            (1, "L3-L4", (60, 66), "disc/v2", 0.6),
        ],
        vocab,
    )
    c = score_detections(gt, pred, np.ones((2, 2)), vocab).classes["disc/v2"]
    assert (c.tp, c.fp, c.fn, c.ignored) == (2, 1, 0, 1)
    assert c.ap == pytest.approx(2 / 3) and c.precision == pytest.approx(2 / 3)
