"""What the suite sees in a dataset folder, before any training.

For every study folder: the readable files, the series found, the T2 sagittal slice the suite
would use (the annotated instance when an annotation names one, else the middle frame of the
automatic choice), the annotated points, and every problem met on the way. Headers are read
without pixels; a study decodes at most the middle slice of each competing sagittal series.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from lit_spine.data.annotation import StudyAnnotation, load_annotations
from lit_spine.data.dicom import (
    PixelReader,
    SliceChoice,
    Study,
    choose_slice,
    find_annotation,
    find_series_map,
    index_dataset,
    load_series_map,
    unknown_side_file_studies,
)
from lit_spine.utils import one_line


def _choice_json(choice: SliceChoice | None, full: bool) -> dict | None:
    if choice is None:
        return None
    out = {"series_uid": choice.series.uid, "instance_uid": choice.instance_uid}
    if full:
        h = choice.header
        out.update(
            {
                "index": choice.index,
                "n_slices": choice.series.n_slices,
                "pixel_spacing": list(h.spacing_mm) if h.spacing_mm is not None else None,
                "spacing_source": h.spacing_source,
                "rows": h.rows,
                "cols": h.cols,
                "description": choice.series.description,
                "source": choice.source,
                "weighting": choice.series.weighting,
                "fallback": choice.fallback,
            }
        )
    else:
        out["index"] = choice.index
    return out


def inspect_study(
    study: Study,
    annotation: StudyAnnotation | None = None,
    series_uid: str | None = None,
    annotated: bool = False,
) -> dict:
    """One study's report (the `--json` object). `annotated`: an annotation file was given."""
    reader = PixelReader()
    # verify: the chosen slice is decoded, so an undecodable one is never shown as usable.
    choice, auto, found = choose_slice(
        study, annotation, series_uid, reader, compare_auto=True, verify=True
    )
    problems = list(study.problems) + found
    if choice is not None and choice.header.spacing_mm is None:
        problems.append(
            f"chosen slice {one_line(choice.header.path)} has no usable pixel spacing "
            f"({choice.header.spacing_problem}): training leaves this study out"
        )
    points = []
    if annotation is not None:
        problems += [f"annotation: {w}" for w in annotation.warnings]
        for p in annotation.points:
            points.append(
                {"identification": p.identification, "coord": [p.x, p.y], "labels": list(p.labels)}
            )
            if choice is not None:
                rows, cols = choice.header.rows, choice.header.cols
                if not (-0.5 <= p.x <= cols - 0.5 and -0.5 <= p.y <= rows - 0.5):
                    problems.append(
                        f"point {p.identification} at ({p.x:g}, {p.y:g}) lies outside "
                        f"the {cols}x{rows} image"
                    )
    elif annotated and study.study_uid:
        problems.append(f"study {study.study_uid} has no entry in the annotation file")
    return {
        "study": study.name,
        "folder": str(study.folder),
        "study_uid": study.study_uid,
        "n_files": study.n_files,
        # A file whose header reads but whose pixels do not decode is not readable.
        "n_readable": study.n_readable - len(reader.failures),
        "n_undecodable": len(reader.failures),
        "series": [
            {
                "series_uid": s.uid,
                "description": s.description,
                "plane": s.plane,
                "weighting": s.weighting,
                "weighting_source": s.weighting_source,
                "localizer": s.localizer,
                "n_slices": s.n_slices,
            }
            for s in study.series
        ],
        "t2_sagittal": _choice_json(choice, full=True),
        "auto_choice": _choice_json(auto, full=False),
        "points": points,
        "problems": problems,
    }


def inspect_dataset(
    root: str | os.PathLike,
    annotation: str | os.PathLike | None = None,
    series_map: str | os.PathLike | None = None,
    vocab: str = "tianchi2020",
    workers: int | None = None,
) -> tuple[list[dict], list[str]]:
    """(one report per study folder, dataset-level problems).

    `annotation` / `series_map` default to the split's side files beside `root`. Raises
    DatasetError (missing or empty root) and AnnotationError (unusable side file).
    """
    root = Path(root)
    studies = index_dataset(root, workers, progress=True)
    annotation = Path(annotation) if annotation else find_annotation(root)
    series_map = Path(series_map) if series_map else find_series_map(root)
    annotations = load_annotations(annotation, vocab) if annotation else {}
    forced = load_series_map(series_map) if series_map else {}
    reports = [
        inspect_study(
            s,
            annotations.get(s.study_uid or ""),
            forced.get(s.study_uid or ""),
            annotated=annotation is not None,
        )
        for s in studies
    ]
    dataset_problems = list(studies.problems)
    dataset_problems += unknown_side_file_studies(
        studies, root, annotation, annotations, series_map, forced
    )
    counts = Counter(s.study_uid for s in studies if s.study_uid)
    dataset_problems += [
        f"StudyInstanceUID {uid} appears in {n} study folders; the cache keeps the first"
        for uid, n in counts.items()
        if n > 1
    ]
    return reports, dataset_problems


def _short(uid: str | None, n: int = 12) -> str:
    if not uid:
        return "-"
    return uid if len(uid) <= n else "…" + uid[-(n - 1) :]


def _series_cell(t2: dict | None) -> str:
    """The chosen series' description (one line, cut); a fallback says so."""
    if t2 is None:
        return "-- none --"
    text = one_line(t2["description"] or "<no description>", 28)
    return f"{text} [fallback {t2['weighting']}]" if t2.get("fallback") else text


def format_table(reports: list[dict], dataset_problems: list[str], max_problems: int = 40) -> str:
    """The readable report: one row per study, a summary block, then the problems."""
    header = (
        "study",
        "study uid",
        "T2 sagittal series",
        "slices",
        "index",
        "size",
        "spacing mm",
        "points",
        "problems",
    )
    rows = []
    for r in reports:
        t2 = r["t2_sagittal"]
        rows.append(
            (
                one_line(r["study"], 40),
                _short(r["study_uid"]),
                _series_cell(t2),
                str(t2["n_slices"]) if t2 else "-",
                (str(t2["index"]) + ("*" if t2["source"] != "auto" else "")) if t2 else "-",
                f"{t2['rows']}x{t2['cols']}" if t2 else "-",
                "{:.3f}x{:.3f}".format(*t2["pixel_spacing"]) if t2 and t2["pixel_spacing"] else "-",
                str(len(r["points"])),
                str(len(r["problems"])),
            )
        )
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append("(* slice chosen by the annotation or series map; otherwise the automatic choice)")
    if any(r["t2_sagittal"] and r["t2_sagittal"].get("fallback") for r in reports):
        lines.append("([fallback W]: no proper T2 sagittal series; a W-weighted series stands in)")

    n_files = sum(r["n_files"] for r in reports)
    n_ok = sum(r["n_readable"] for r in reports)
    series = Counter(f"{s['weighting']} {s['plane']}" for r in reports for s in r["series"])
    with_t2 = sum(r["t2_sagittal"] is not None for r in reports)
    mismatch = sum(
        r["auto_choice"] is not None
        and r["t2_sagittal"] is not None
        and r["t2_sagittal"]["source"] == "annotation"
        and r["auto_choice"]["instance_uid"] != r["t2_sagittal"]["instance_uid"]
        for r in reports
    )
    n_annotated = sum(bool(r["points"]) for r in reports)
    # one_line: a plugin's multi-line error or a file name with a newline keeps one row each.
    all_problems = [one_line(p, 400) for p in dataset_problems] + [
        one_line(f"{r['study']}: {p}", 400) for r in reports for p in r["problems"]
    ]
    lines += [
        "",
        "summary",
        f"  studies               {len(reports)} ({with_t2} with a T2 sagittal slice, "
        f"{n_annotated} annotated)",
        f"  files                 {n_files} ({n_ok} readable, {n_files - n_ok} unreadable)",
        "  series found          "
        + (", ".join(f"{n} {k}" for k, n in sorted(series.items())) or "none"),
        f"  annotation mismatches {mismatch} (annotated slice != automatic choice)",
        f"  problems              {len(all_problems)}",
    ]
    if all_problems:
        lines += ["", "problems"]
        lines += [f"  {p}" for p in all_problems[:max_problems]]
        if len(all_problems) > max_problems:
            lines.append(f"  ... and {len(all_problems) - max_problems} more (--json lists all)")
    return "\n".join(lines)


def inspect_rsna2024(root: str, task: str = "rsna2024_canal") -> tuple[dict, list[str], str]:
    """An RSNA 2024 dataset (`--format rsna2024`) for `task`: the JSON summary (studies found,
    series chosen, points and grades), the problems and the text report."""
    from lit_spine.data.rsna import read_rsna2024
    from lit_spine.data.rsna_cache import locate_instances

    data = read_rsna2024(root, task)
    for st in data.studies:  # the headers of the labelled files, as the cache build reads them
        locate_instances(data.root, st, data.problems)
    studies = [
        {
            "study_id": st.study_id,
            "series_id": st.series_id,
            "points": {
                lv: {"instance_number": p.instance_number, "x": p.x, "y": p.y}
                for lv, p in st.points.items()
            },
            "grades": dict(st.grades),
        }
        for st in data.studies
    ]
    summary = data.summary()
    lines = [
        f"{summary['studies']} studies, series {summary['series']!r}, "
        f"{summary['points']} points, {summary['grades']} grades (task {summary['task']})"
    ]
    for st in studies:
        levels = ", ".join(f"{lv}@{p['instance_number']}" for lv, p in st["points"].items())
        lines.append(f"  study {st['study_id']} series {st['series_id']}: {levels}")
    return _layout_report(summary, studies, data.problems, lines)


def inspect_spider(root: str, task: str = "spider_disc") -> tuple[dict, list[str], str]:
    """A SPIDER dataset (`--format spider`): the JSON summary (series files found, patients
    kept, the mid-sagittal slice, mask points in pixels and mm, grades, the task's labels per
    point), the problems and the text report."""
    from lit_spine.data.spider import read_spider
    from lit_spine.task import SPIDER_FINDING_NAMES

    data = read_spider(root, task)
    studies = [
        {
            "patient": st.patient,
            "series": st.series,
            "image": str(st.image_path),
            "slice_index": st.slice_index,
            "n_slices": st.n_slices,
            "spacing_mm": list(st.spacing_mm),
            "points": {
                lv: {"label": p.label, "x": p.x, "y": p.y, "x_mm": p.x_mm, "y_mm": p.y_mm}
                for lv, p in st.points.items()
            },
            "pfirrmann": {lv: g + 1 for lv, g in st.grades.items()},
            "gradings": st.gradings,
            "labels": {lv: list(codes) for lv, codes in st.labels.items()},
        }
        for st in data.studies
    ]
    summary = data.summary()
    lines = [
        f"{summary['series_files']} series files, {summary['studies']} patients kept, "
        f"{summary['points']} task points, {summary['grades']} grades (task {summary['task']})"
    ]
    for st in studies:
        graded = " ".join(f"{lv}:{g}" for lv, g in st["pfirrmann"].items())
        line = (
            f"  patient {st['patient']} {st['series']} slice {st['slice_index']}/"
            f"{st['n_slices']}: {len(st['points'])} points; Pfirrmann {graded or '-'}"
        )
        if data.task.name != "spider_disc":
            found = " ".join(
                f"{lv}:{'+'.join(SPIDER_FINDING_NAMES[c] for c in codes)}"
                for lv, codes in st["labels"].items()
                if "/" in lv
            )
            line += f"; findings {found or '-'}"
        lines.append(line)
    return _layout_report(summary, studies, data.problems, lines)


def _layout_report(
    summary: dict, studies: list[dict], problems: list[str], lines: list[str]
) -> tuple[dict, list[str], str]:
    """A task layout's (JSON summary, problems, text report): the report is `lines`, then
    the problems."""
    lines = [*lines, f"{len(problems)} problem(s)", *(f"  {p}" for p in problems)]
    payload = summary | {"num_studies": len(studies), "studies": studies}
    return payload, list(problems), "\n".join(lines)
