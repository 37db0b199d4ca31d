"""Fuzz tests of `lit-spine evaluate`'s inputs: annotation / prediction JSON and its options.

Each generated input has an expected outcome class, asserted exactly:
- error: exit code 2, nothing on stdout, one stderr line naming the file (and study, point or
  option) and what is wrong; or
- reported: exit code 0, the rest scored, and a problem of the expected kind naming the file,
  study and point in the JSON's "problems".
Never a traceback. Inputs come from `hypothesis` strategies (derandomised, so the suite is
reproducible) plus explicit cases; each test runs under a time limit. The CLI runs in-process
through `main(argv)`, with a few real subprocess runs at the end.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import write_slice
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement

from lit_spine.commands.evaluate import main
from lit_spine.data.annotation import MAX_COORD_PX
from lit_spine.data.dicom import MAX_SPACING_ASPECT, SPACING_RANGE_MM
from lit_spine.data.labels import POINT_NAMES, get_vocabulary

VOCAB = get_vocabulary("tianchi2020")
ROOT = Path(__file__).resolve().parents[1]
N_STUDIES = 2
IMAGE_PX = 96  # rows = columns of the DICOM images written for the --data-root cases
N_SLICES = 3


def fuzz(n: int):
    """Hypothesis settings of these tests: `n` reproducible examples, none over 5 s."""
    return settings(
        max_examples=n,
        deadline=5000,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------- valid inputs
def study_uid(s: int) -> str:
    return f"1.2.826.0.9.{s}"


def instance_uid(s: int) -> str:
    return f"{study_uid(s)}.7.1"


def valid_files() -> tuple[list, list]:
    """A clean ground truth (11 points per study) and predictions near it (with scores)."""
    rng = np.random.default_rng(0)
    gt, pred = [], []
    for s in range(N_STUDIES):
        g_pts, p_pts = [], []
        for k, name in enumerate(POINT_NAMES):
            kind = "disc" if "-" in name else "vertebra"
            code = VOCAB.codes(kind)[k % len(VOCAB.codes(kind))]
            x, y = 30.0 + k, 5.0 + 7.5 * k
            g_pts.append(
                {"coord": [x, y], "tag": {"identification": name, kind: code}, "zIndex": 1}
            )
            dx, dy = rng.normal(0, 2, 2).round(2)
            p_pts.append(
                {
                    "coord": [x + dx, y + dy],
                    "tag": {"identification": name, kind: code},
                    "score": round(float(rng.uniform(0.1, 1.0)), 3),
                }
            )
        for pts, out in ((g_pts, gt), (p_pts, pred)):
            out.append(
                {
                    "studyUid": study_uid(s),
                    "data": [
                        {
                            "seriesUid": f"{study_uid(s)}.7",
                            "instanceUid": instance_uid(s),
                            "annotation": [{"data": {"point": pts}}],
                        }
                    ],
                }
            )
    return gt, pred


GT, PRED = valid_files()


def points(entries: list, s: int) -> list:
    return entries[s]["data"][0]["annotation"][0]["data"]["point"]


def write_study_image(path: Path, s: int, **fields) -> str:
    """One blank IMAGE_PX-square T2 sagittal slice of study s (0.5 mm pixels) in series
    '<study>.7'; `fields` go to `write_slice` (instance UID, position)."""
    return write_slice(
        path,
        np.zeros((IMAGE_PX, IMAGE_PX)),
        study_uid=study_uid(s),
        series_uid=f"{study_uid(s)}.7",
        description="T2 sag",
        spacing=(0.5, 0.5),
        **fields,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder for the files each example writes, and a DICOM split for --data-root runs."""
    base = tmp_path_factory.mktemp("fuzz_json")
    for s in range(N_STUDIES):
        for z in range(N_SLICES):
            write_study_image(
                base / "val" / f"study{s}" / f"image{z}.dcm",
                s,
                position=(float(z), 0.0, 0.0),
                instance_uid=instance_uid(s) if z == 1 else f"{study_uid(s)}.7.9{z}",
            )
    return base


# ---------------------------------------------------------------------------- running
def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in-process; (exit code, stdout, stderr). argparse exits are caught."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    assert "Traceback" not in err.getvalue()
    return rc, out.getvalue(), err.getvalue()


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def clean_files(base: Path) -> tuple[Path, Path]:
    """The clean ground truth and predictions written as base/gt.json and base/pred.json."""
    return write(base / "gt.json", GT), write(base / "pred.json", PRED)


def evaluate(base: Path, gt=GT, pred=PRED, extra=("--spacing-mm", "0.5,0.5"), json_out=True):
    """Write both files (objects or raw bytes) and run evaluate on them."""
    gt_path = write(base / "gt.json", gt)
    pred_path = write(base / "pred.json", pred)
    argv = ["--pred", str(pred_path), "--gt", str(gt_path), *extra]
    return run_cli([*argv, "--json"] if json_out else argv), gt_path, pred_path


def assert_error(result, file: Path | None, *fragments: str) -> str:
    """Exit 2, empty stdout and one stderr line naming the file and every fragment."""
    rc, out, err = result
    assert rc == 2, (rc, out[:300], err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("lit-spine evaluate: error: "), line
    if file is not None:
        assert str(file) in line, line
    for text in fragments:
        assert text in line, (text, line)
    return line


def assert_reported(result, file: Path, kind: str, study: str | None, point: str | None) -> dict:
    """Exit 0, a parsable report, and a problem of `kind` naming file, study and point."""
    rc, out, err = result
    assert rc == 0, err
    report = json.loads(out)
    found = [
        p
        for p in report["problems"]
        if p["kind"] == kind
        and p["file"] == str(file)
        and p["study"] == study
        and p["point"] == point
    ]
    assert found, (kind, study, point, report["problems"])
    assert all("\n" not in line for line in err.splitlines(keepends=False))
    assert f"warning: {file}" in err  # the problem is printed, not only collected
    return report


def baseline_report(base: Path) -> dict:
    rc, out, err = evaluate(base)[0]
    assert rc == 0, err
    report = json.loads(out)
    assert report["problems"] == [] and report["skipped_studies"] == []
    return report


def score_fields(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("problems", "skipped_studies")}


# ---------------------------------------------------------------------------- strategies
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
finite_px = st.floats(-MAX_COORD_PX, MAX_COORD_PX)
bad_coords = st.one_of(
    json_scalars,
    st.dictionaries(st.text(max_size=3), json_scalars, max_size=2),
    st.lists(finite_px, max_size=1),
    st.lists(finite_px, min_size=3, max_size=5),
    st.tuples(
        st.sampled_from([0, 1]),
        st.one_of(
            st.text(max_size=4),
            st.none(),
            st.booleans(),
            st.lists(finite_px, max_size=2),
            st.sampled_from([math.nan, math.inf, -math.inf]),
        ),
    ),
    st.tuples(
        st.sampled_from([0, 1]),
        st.one_of(
            st.floats(65535.001, 1e300), st.floats(-1e300, -65535.001), st.integers(65536, 10**30)
        ),
    ),
)
# --------------------------------------------------------------------------------------
targets = st.sampled_from(["gt", "pred"])
study_i = st.integers(0, N_STUDIES - 1)
point_i = st.integers(0, len(POINT_NAMES) - 1)


def fuzzed(n: int, **strategies):
    """A fuzz test: `n` examples (see `fuzz`) of the arguments `strategies` draw, under a
    120 s limit."""

    def decorate(test):
        return pytest.mark.timeout(120)(fuzz(n)(given(**strategies)(test)))

    return decorate


def fuzzed_point(n: int, **strategies):
    """`fuzzed`, drawing the file to edit (target), a study (s) and a point (k) first."""
    return fuzzed(n, target=targets, s=study_i, k=point_i, **strategies)


def mutated(target: str):
    """Deep copies of both files and the one to edit."""
    gt, pred = copy.deepcopy(GT), copy.deepcopy(PRED)
    return gt, pred, (gt if target == "gt" else pred)


def path_of(target: str, gt_path: Path, pred_path: Path) -> Path:
    return gt_path if target == "gt" else pred_path


def evaluated(target: str, base: Path, gt=GT, pred=PRED, **options) -> tuple[tuple, Path]:
    """`evaluate`'s result and the path of the file that `target` ("gt" or "pred") names."""
    result, gt_path, pred_path = evaluate(base, gt, pred, **options)
    return result, path_of(target, gt_path, pred_path)


# ---------------------------------------------------------------------------- point values
@fuzzed_point(40, coord=bad_coords)
def test_fuzz_bad_coord_is_an_error_naming_study_and_point(work, target, s, k, coord):
    gt, pred, edit = mutated(target)
    if isinstance(coord, tuple):  # (which axis, bad value) in an otherwise good pair
        axis, value = coord
        coord = [10.0, 10.0]
        coord[axis] = value
    points(edit, s)[k]["coord"] = coord
    result, gt_path, pred_path = evaluate(work, gt, pred)
    where = f"study {study_uid(s)}, point {POINT_NAMES[k]}"
    assert_error(result, path_of(target, gt_path, pred_path), where, "'coord'")


bad_z = st.one_of(
    st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda v: not (math.isfinite(v) and v == int(v) and v >= 0)
    ),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.integers(0, 5), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@fuzzed_point(30, z=bad_z)
def test_fuzz_bad_zindex_is_an_error(work, target, s, k, z):
    gt, pred, edit = mutated(target)
    points(edit, s)[k]["zIndex"] = z
    result, gt_path, pred_path = evaluate(work, gt, pred)
    assert_error(
        result,
        path_of(target, gt_path, pred_path),
        f"study {study_uid(s)}, point {POINT_NAMES[k]}",
        "'zIndex' must be a non-negative integer",
    )


def is_valid_disease(kind: str, value) -> bool:
    """The oracle: a string of comma-joined known codes of the point's type ('' is v1)."""
    if not isinstance(value, str):
        return False
    return all(c.strip() in VOCAB.codes(kind) for c in value.split(",") if c.strip())


@fuzzed_point(
    30,
    disease=st.one_of(
        json_scalars,
        st.lists(st.sampled_from(["v1", "v2", "V2", "v9", "x", " ", "v0"]), max_size=3).map(
            ",".join
        ),
    ),
)
def test_fuzz_bad_disease_is_an_error_valid_one_is_scored(work, target, s, k, disease):
    gt, pred, edit = mutated(target)
    name = POINT_NAMES[k]
    kind = "disc" if "-" in name else "vertebra"
    points(edit, s)[k]["tag"][kind] = disease
    result, gt_path, pred_path = evaluate(work, gt, pred)
    if is_valid_disease(kind, disease):
        assert result[0] == 0, result[2]
        assert json.loads(result[1])["problems"] == []
    else:
        assert_error(
            result, path_of(target, gt_path, pred_path), f"study {study_uid(s)}, point {name}"
        )


@fuzzed_point(
    25,
    score=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 <= v <= 1),
        st.text(max_size=4),
        st.booleans(),
        st.lists(st.floats(0, 1), max_size=2),
        st.integers(2, 10**30),
    ),
)
def test_fuzz_bad_score_is_an_error(work, target, s, k, score):
    gt, pred, edit = mutated(target)
    points(edit, s)[k]["score"] = score
    result, gt_path, pred_path = evaluate(work, gt, pred)
    assert_error(
        result,
        path_of(target, gt_path, pred_path),
        f"study {study_uid(s)}, point {POINT_NAMES[k]}",
        "'score' must be a number in [0, 1]",
    )


# ---------------------------------------------------------------------------- identifications
@fuzzed_point(
    35,
    ident=st.one_of(
        st.sampled_from(POINT_NAMES).flatmap(
            lambda n: st.lists(st.booleans(), min_size=len(n), max_size=len(n)).map(
                lambda up: "".join(c.upper() if u else c.lower() for c, u in zip(n, up))
            )
        ),
        st.sampled_from(["", " ", "\t", "T11-T12", "S1", "L6", "L1 - L2", "L1\nL2"]),
        st.text(max_size=8),
        json_scalars.filter(lambda v: not isinstance(v, str)),
    ),
)
def test_fuzz_identification_wrong_case_empty_or_unknown(work, target, s, k, ident):
    gt, pred, edit = mutated(target)
    points(edit, s)[k]["tag"]["identification"] = ident
    result, gt_path, pred_path = evaluate(work, gt, pred)
    file = path_of(target, gt_path, pred_path)
    canonical = {n.casefold(): n for n in POINT_NAMES}
    stripped = ident.strip() if isinstance(ident, str) else None
    if stripped == POINT_NAMES[k]:
        assert result[0] == 0, result[2]
    elif stripped in POINT_NAMES:  # another point's name: a duplicate, see the next tests
        code = next(v for key, v in points(edit, s)[k]["tag"].items() if key != "identification")
        if not is_valid_disease("disc" if "-" in stripped else "vertebra", code):
            assert_error(result, file, f"point {stripped}", "unknown")
        elif target == "gt":
            assert_error(result, file, f"point {stripped}: annotated twice")
        else:
            assert result[0] == 0, result[2]
    elif not stripped:
        assert_error(result, file, f"study {study_uid(s)}, point {k}", "identification")
    elif stripped.casefold() in canonical:
        assert_error(result, file, "wrong case", repr(canonical[stripped.casefold()]))
    else:
        report = assert_reported(result, file, "unknown_identification", study_uid(s), stripped)
        if target == "gt":
            assert report["n_gt_points"] < N_STUDIES * len(POINT_NAMES)
            kinds = {p["kind"] for p in report["problems"]}
            assert kinds == {"unknown_identification", "missing_points"}


# ---------------------------------------------------------------------------- duplicates
@fuzzed_point(
    30,
    how=st.sampled_from(["study", "study_other_instance", "point_moved", "point_exact"]),
    dx=st.floats(0.01, 500),
)
def test_fuzz_duplicate_studies_and_points(work, target, s, k, how, dx):
    base = baseline_report(work)
    gt, pred, edit = mutated(target)
    if how.startswith("study"):
        twin = copy.deepcopy(edit[s])
        if how == "study_other_instance":
            twin["data"][0]["instanceUid"] = "9.9.9"
        edit.append(twin)
    else:
        twin = copy.deepcopy(points(edit, s)[k])
        if how == "point_moved":
            twin["coord"][0] += dx
        points(edit, s).append(twin)
    result, gt_path, pred_path = evaluate(work, gt, pred)
    file = path_of(target, gt_path, pred_path)
    if how.startswith("study"):
        assert_error(result, file, f"study {study_uid(s)} is listed twice")
    elif how == "point_moved" and target == "gt":
        assert_error(result, file, f"study {study_uid(s)}, point {POINT_NAMES[k]}: annotated twice")
    elif how == "point_moved":  # several candidates for one point are a valid prediction
        assert result[0] == 0 and json.loads(result[1])["problems"] == []
    else:  # an exact copy is scored once: the numbers equal the clean run's
        report = assert_reported(result, file, "duplicate_point", study_uid(s), POINT_NAMES[k])
        assert score_fields(report) == score_fields(base)


@pytest.mark.timeout(60)
def test_duplicate_check_is_linear_on_120000_points(work):
    """One ground-truth study with 120,000 points (it hung on a quadratic check)."""
    gt = copy.deepcopy(GT)
    pts = points(gt, 1)
    pts += [
        {"coord": [float(i % 300), float(i // 300)], "tag": dict(pts[i % 11]["tag"])}
        for i in range(120_000)
    ]
    result, gt_path, _ = evaluate(work, gt, PRED)
    assert_error(result, gt_path, f"study {study_uid(1)}, point T12-L1: annotated twice")


# ---------------------------------------------------------------------------- uids, structure
@fuzzed(
    30,
    target=targets,
    s=study_i,
    key=st.sampled_from(["studyUid", "instanceUid", "seriesUid"]),
    value=st.one_of(
        st.lists(st.text(max_size=4), max_size=2),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
        st.integers(),
        st.floats(allow_nan=True),
        st.booleans(),
        st.sampled_from(["", "   ", "\0"]),
    ),
)
def test_fuzz_uid_fields_must_be_strings(work, target, s, key, value):
    gt, pred, edit = mutated(target)
    (edit[s] if key == "studyUid" else edit[s]["data"][0])[key] = value
    result, gt_path, pred_path = evaluate(work, gt, pred)
    assert_error(result, path_of(target, gt_path, pred_path), f"'{key}' must be a non-empty string")


def _nodes(obj, path=()):
    yield path
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, (*path, i))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, (*path, k))


NODES = list(_nodes(GT))


@fuzzed(40, target=targets, node=st.sampled_from(NODES), value=json_values)
def test_fuzz_any_node_replaced_is_scored_or_a_one_line_error(work, target, node, value):
    """Random JSON anywhere in the tree: exit 0 with a full report, or exit 2 naming the file."""
    gt, pred, edit = mutated(target)
    if node:
        parent = edit
        for key in node[:-1]:
            parent = parent[key]  # both files share the tree's shape down to the points
        parent[node[-1]] = value  # a key the prediction lacks (zIndex) is added
    else:
        gt, pred = (value, pred) if target == "gt" else (gt, value)
    result, gt_path, pred_path = evaluate(work, gt, pred)
    rc, out, err = result
    if rc == 0:
        report = json.loads(out)
        assert report["n_studies"] == N_STUDIES
    else:
        assert_error(result, path_of(target, gt_path, pred_path))


def dumps_with_repeated_key(obj, path: tuple, value) -> str:
    """JSON text of `obj` in which the object at `path` gives its first key a second time."""
    if isinstance(obj, list):
        return (
            "["
            + ",".join(
                dumps_with_repeated_key(v, path[1:], value)
                if path and path[0] == i
                else json.dumps(v)
                for i, v in enumerate(obj)
            )
            + "]"
        )
    if isinstance(obj, dict):
        pairs = [
            f"{json.dumps(k)}:"
            + (
                dumps_with_repeated_key(v, path[1:], value)
                if path and path[0] == k
                else json.dumps(v)
            )
            for k, v in obj.items()
        ]
        if not path:
            pairs.append(f"{json.dumps(next(iter(obj)))}:{json.dumps(value)}")
        return "{" + ",".join(pairs) + "}"
    raise AssertionError(f"no object at {path}")


@fuzzed(30, target=targets, data=st.data(), same=st.booleans())
def test_fuzz_a_key_given_twice_in_one_object_is_an_error(work, target, data, same):
    """JSON readers keep one of two equal keys silently: the suite names the key instead."""
    gt, pred, edit = mutated(target)
    objects = []
    for node in _nodes(edit):
        obj = edit
        for key in node:
            obj = obj[key]
        if isinstance(obj, dict) and obj:
            objects.append((node, obj))
    node, obj = data.draw(st.sampled_from(objects))
    first = next(iter(obj))
    value = obj[first] if same else data.draw(json_values)
    text = dumps_with_repeated_key(edit, node, value).encode()
    files = (text, pred) if target == "gt" else (gt, text)
    result, gt_path, pred_path = evaluate(work, *files)
    assert_error(result, path_of(target, gt_path, pred_path), f"key '{first}' appears twice")


# ---------------------------------------------------------------------------- bytes of the file
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "utf-8-sig", "cp1252"]


@fuzzed(
    30,
    target=targets,
    encoding=st.sampled_from(ENCODINGS),
    junk=st.binary(max_size=6),
    where=st.sampled_from(["none", "prefix", "suffix"]),
)
def test_fuzz_encodings_and_junk_bytes(work, target, encoding, junk, where):
    gt, pred, edit = mutated(target)
    edit[0]["note"] = "Wirbelsäule"  # non-ASCII text, so that a wrong encoding shows
    data = json.dumps(edit, ensure_ascii=False).encode(encoding)
    if where == "prefix":
        data = junk + data
    elif where == "suffix":
        data = data + junk
    base = baseline_report(work)
    files = (data, pred) if target == "gt" else (gt, data)
    result, gt_path, pred_path = evaluate(work, *files)
    file = path_of(target, gt_path, pred_path)
    try:  # the oracle: what a strict UTF-8 (optional BOM) JSON reader accepts
        text = data.decode("utf-8-sig")
        ok = "\0" not in text[:4096] and isinstance(json.loads(text), list)
    except (UnicodeDecodeError, ValueError):
        ok = False
    if ok:
        assert result[0] == 0, result[2]
        assert score_fields(json.loads(result[1])) == score_fields(base)
    else:
        line = assert_error(result, file)
        if encoding.startswith("utf-16") or encoding.startswith("utf-32"):
            assert "UTF-8" in line or "malformed JSON" in line


@pytest.mark.parametrize(
    "content, expected",
    [
        (json.dumps(GT).encode("utf-16"), "the file is UTF-16 text; save it as UTF-8"),
        (json.dumps(GT).encode("utf-32"), "the file is UTF-32 text; save it as UTF-8"),
        (json.dumps(GT).encode("utf-16-le"), "NUL bytes"),
        (json.dumps(GT, ensure_ascii=False).replace("1.2", "é1.2").encode("latin-1"), "not UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b"[" + b"1" * 5000 + b"]", "unreadable JSON value"),
        (b"", "malformed JSON at line 1, column 1"),
        (b"[{]", "malformed JSON"),
        (b'{"studyUid": "1"}', "expected a JSON list of studies"),
        (b"[42]", "entry 0 is not an object with a 'studyUid'"),
    ],
)
@pytest.mark.parametrize("target", ["gt", "pred"])
def test_unreadable_files_give_one_line_errors(work, content, expected, target):
    files = (content, PRED) if target == "gt" else (GT, content)
    result, file = evaluated(target, work, *files)
    assert_error(result, file, expected)


@pytest.mark.parametrize("target", ["gt", "pred"])
def test_utf8_bom_is_accepted(work, target):
    data = b"\xef\xbb\xbf" + json.dumps(GT if target == "gt" else PRED).encode()
    files = (data, PRED) if target == "gt" else (GT, data)
    result, _, _ = evaluate(work, *files)
    assert result[0] == 0 and score_fields(json.loads(result[1])) == score_fields(
        baseline_report(work)
    )


@pytest.mark.parametrize("target", ["--gt", "--pred"])
def test_a_folder_is_not_a_file(work, target):
    gt_path, pred_path = clean_files(work)
    paths = {"--gt": str(gt_path), "--pred": str(pred_path), target: str(work)}
    result = run_cli([*(a for k, v in paths.items() for a in (k, v)), "--spacing-mm", "1,1"])
    assert_error(result, work, "is a folder; expected a JSON")


def test_file_names_and_values_with_newlines_stay_on_one_line(work):
    odd = work / "odd\nname.json"
    write(odd, [{"studyUid": "1\n2", "data": [{"instanceUid": ["a"]}]}])
    result = run_cli(["--gt", str(odd), "--pred", str(odd), "--spacing-mm", "1,1"])
    assert_error(result, None, "odd\\nname.json", "study 1\\n2", "'instanceUid'")
    gt = copy.deepcopy(GT)
    points(gt, 0)[0]["tag"]["identification"] = "T11\nT12"
    result, gt_path, _ = evaluate(work, gt, PRED, json_out=False)
    rc, out, err = result
    assert rc == 0 and "unexpected identification 'T11\\nT12' ignored" in out
    assert "Problems (2)" in out and "T11\nT12" not in out


@pytest.mark.parametrize(
    "tag, expected",
    [
        ({"identification": "L1", "vertebra": None}, "disease 'vertebra' must be a string"),
        ({"identification": "L1-L2", "disc": None, "vertebra": "v1"}, "disease 'disc' must be"),
        ({"identification": "L1"}, "no disease label (tag key 'vertebra')"),
        ({"identification": "l1", "vertebra": "v1"}, "identification 'l1' is in the wrong case"),
        ({"identification": "", "vertebra": "v1"}, "must be a non-empty string"),
        ({"vertebra": "v1"}, "'tag'.'identification' must be a non-empty string"),
    ],
)
@pytest.mark.parametrize("target", ["gt", "pred"])
def test_null_disease_and_bad_identification_cases(work, tag, expected, target):
    gt, pred, edit = mutated(target)
    points(edit, 1)[1]["tag"] = tag
    result, file = evaluated(target, work, gt, pred)
    line = assert_error(result, file, f"study {study_uid(1)}")
    assert expected in line


@pytest.mark.parametrize("gt", [[], [{"studyUid": "1"}], [{"studyUid": "1", "data": None}]])
def test_nothing_to_score_is_an_error(work, gt):
    result, gt_path, _ = evaluate(work, gt, [])
    assert_error(result, gt_path, "no ground-truth points to score")


def test_one_study_annotating_two_images_is_an_error(work):
    gt = copy.deepcopy(GT)
    other = copy.deepcopy(gt[0]["data"][0])
    other["instanceUid"] = "1.2.3.999"
    gt[0]["data"].append(other)
    result, gt_path, _ = evaluate(work, gt, PRED)
    assert_error(result, gt_path, "annotates two images", "1.2.3.999")


# ---------------------------------------------------------------------------- against images
@fuzzed_point(
    25,
    axis=st.sampled_from([0, 1]),
    value=st.one_of(st.floats(-65535, -0.51), st.floats(IMAGE_PX - 0.49, 65535)),
)
def test_fuzz_points_outside_the_image_are_reported_and_scored(work, target, s, k, axis, value):
    gt, pred, edit = mutated(target)
    points(edit, s)[k]["coord"][axis] = value
    extra = ("--data-root", str(work / "val"))
    result, gt_path, pred_path = evaluate(work, gt, pred, extra)
    report = assert_reported(
        result, path_of(target, gt_path, pred_path), "outside_image", study_uid(s), POINT_NAMES[k]
    )
    assert report["n_studies"] == N_STUDIES and report["n_gt_points"] == N_STUDIES * 11


@fuzzed_point(15, z=st.integers(N_SLICES, 10**6))
def test_fuzz_zindex_outside_the_series_is_reported(work, target, s, k, z):
    gt, pred, edit = mutated(target)
    points(edit, s)[k]["zIndex"] = z
    result, gt_path, pred_path = evaluate(work, gt, pred, ("--data-root", str(work / "val")))
    report = assert_reported(
        result,
        path_of(target, gt_path, pred_path),
        "z_outside_series",
        study_uid(s),
        POINT_NAMES[k],
    )
    assert f"zIndex {z} is outside the annotated series ({N_SLICES} slices" in "".join(
        p["message"] for p in report["problems"]
    )


# ---------------------------------------------------------------------------- pixel spacing
def _set_spacing(path: Path, raw: str | None) -> None:
    ds = pydicom.dcmread(path)
    if raw is None:
        del ds.PixelSpacing
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid DS we write
            ds["PixelSpacing"] = DataElement(0x00280030, "DS", raw)
    ds.save_as(path)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, "PixelSpacing missing"),
        ("nan\\nan", "is not two finite numbers"),
        ("0\\0", "outside the plausible"),
        ("-0.5\\-0.5", "outside the plausible"),
        ("1e-9\\1e-9", "outside the plausible"),
        ("1e6\\1e6", "outside the plausible"),
        ("0.5\\5", "more anisotropic than 1:4"),
        ("truncated", "no readable DICOM image for annotated instance"),
    ],
)
def test_unusable_pixel_spacing_stops_or_is_skipped(tmp_path, raw, reason):
    split = tmp_path / "val"
    for s in range(N_STUDIES):
        write_study_image(split / f"study{s}" / "image1.dcm", s, instance_uid=instance_uid(s))
    bad = split / "study1" / "image1.dcm"
    if raw == "truncated":
        bad.write_bytes(bad.read_bytes()[:400])
    else:
        _set_spacing(bad, raw)
    args = ("--data-root", str(split))
    result, _, _ = evaluate(tmp_path, GT, PRED, args)
    line = assert_error(result, None, f"study {study_uid(1)}", reason, "--spacing-mm")
    assert "--skip-missing-spacing" in line
    if raw != "truncated":
        assert str(bad) in line
    rc, out, err = evaluate(tmp_path, GT, PRED, (*args, "--skip-missing-spacing"))[0]
    assert rc == 0, err
    report = json.loads(out)
    assert report["n_studies"] == 1 and report["n_gt_points"] == 11
    (skipped,) = report["skipped_studies"]
    assert skipped["study"] == study_uid(1) and reason in skipped["reason"]
    assert f"skipped: study {study_uid(1)}" in err
    rc, table, _ = evaluate(tmp_path, GT, PRED, (*args, "--skip-missing-spacing"), False)[0]
    assert rc == 0 and "Skipped studies (1, not scored)" in table and study_uid(1) in table


# ---------------------------------------------------------------------------- options
def spacing_ok(row: float, col: float) -> bool:
    lo, hi = SPACING_RANGE_MM
    if not all(math.isfinite(v) and lo <= v <= hi for v in (row, col)):
        return False
    return max(row, col) / min(row, col) <= MAX_SPACING_ASPECT


number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "nan",
            "NaN",
            "inf",
            "-inf",
            "Infinity",
            "0",
            "-0",
            "1e-300",
            "1e308",
            "8mm",
            "",
            " ",
            "1,2",
            "0x10",
        ]
    ),
)


@fuzzed(
    40,
    option=st.sampled_from(["--radius-mm", "--baseline-radius-mm", "--sdr-mm", "--spacing-mm"]),
    values=st.lists(number_text, min_size=1, max_size=3),
)
def test_fuzz_options_are_checked_at_parse_time(work, option, values):
    text = ",".join(values)
    gt_path, pred_path = write(work / "gt.json", GT), write(work / "pred.json", PRED)
    # OPTION=VALUE, so that argparse never takes a value such as '-inf' for an option.
    argv = ["--pred", str(pred_path), "--gt", str(gt_path), f"{option}={text}", "--json"]
    if option != "--spacing-mm":
        argv += ["--spacing-mm", "0.5,0.5"]
    rc, out, err = run_cli(argv)
    try:
        numbers = [float(v) for v in text.split(",")]
    except ValueError:
        numbers = None
    radius_ok = lambda v: math.isfinite(v) and v > 0  # noqa: E731
    if numbers is None:
        ok = False
    elif option == "--spacing-mm":
        ok = len(numbers) == 2 and spacing_ok(*numbers)
    elif option == "--sdr-mm":
        ok = all(map(radius_ok, numbers)) and len(set(numbers)) == len(numbers)
    else:
        ok = len(numbers) == 1 and radius_ok(numbers[0])
    if ok:
        assert rc == 0, err
        json.loads(out)
    else:
        assert rc == 2 and out == ""
        (line,) = [ln for ln in err.splitlines() if "error:" in ln]
        assert f"argument {option}" in line
        if option == "--spacing-mm" and numbers is not None and len(numbers) == 2:
            assert "mm, at most 4:1 apart" in line
        elif option in ("--radius-mm", "--baseline-radius-mm"):
            assert "finite radius in mm > 0" in line


@pytest.mark.parametrize(
    "option, value",
    [
        ("--radius-mm", "nan"),
        ("--radius-mm", "0"),
        ("--radius-mm", "-8"),
        ("--radius-mm", "inf"),
        ("--baseline-radius-mm", "nan"),
        ("--sdr-mm", "nan"),
        ("--sdr-mm", "2,2"),
        ("--spacing-mm", "inf,inf"),
        ("--spacing-mm", "1e-300,1e-300"),
    ],
)
def test_issue_options_are_rejected(work, option, value):
    gt_path, pred_path = clean_files(work)
    rc, out, err = run_cli(["--pred", str(pred_path), "--gt", str(gt_path), option, value])
    assert rc == 2 and out == "" and f"argument {option}: " in err


# ---------------------------------------------------------------------------- real processes
@pytest.mark.timeout(180)
def test_subprocess_runs_exit_cleanly(work):
    """Real `python -m lit_spine evaluate` processes (run side by side: each imports torch)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gt_path = write(work / "gt_sub.json", GT)
    utf16 = work / "gt_utf16.json"
    utf16.write_bytes(json.dumps(GT).encode("utf-16"))
    dup = copy.deepcopy(PRED)
    points(dup, 0).append(copy.deepcopy(points(dup, 0)[3]))
    dup_path = write(work / "pred_dup.json", dup)
    cases = [
        (["--gt", str(utf16), "--pred", str(dup_path), "--radius-mm", "5"], 2, "UTF-16"),
        (["--gt", str(gt_path), "--pred", str(dup_path), "--spacing-mm", "1,1"], 0, "Problems (1)"),
    ]
    with tempfile.TemporaryDirectory() as cwd:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "lit_spine", "evaluate", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=cwd,
            )
            for argv, _, _ in cases
        ]
        for proc, (_, code, text) in zip(procs, cases):
            out, err = proc.communicate(timeout=150)
            assert proc.returncode == code, err
            assert "Traceback" not in err
            assert text in out + err
