"""Choosing the annotated slice of a study: instance, series map, or the T2 sagittal series.

`choose_slice` uses the annotation's instance when it names one that exists, else the
series-map series, else the T2 sagittal series (highest mean intensity among sagittal T2
series, which rejects the fat-suppressed variant) and its middle frame ``(n - 1) // 2``; with
no T2 sagittal series another sagittal series is used and flagged as a fallback; localizers
are never chosen. Only the middle slice of each competing series is decoded, once, through
a `PixelReader`. Written by hand: no library chooses series.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import pydicom

from lit_spine.data.annotation import StudyAnnotation
from lit_spine.data.dicom.header import SliceHeader
from lit_spine.data.dicom.limits import MIN_SERIES_SLICES, DicomFileError
from lit_spine.data.dicom.pixels import PixelReader
from lit_spine.data.dicom.series import Series, Study
from lit_spine.utils import one_line


@dataclass(frozen=True)
class SliceChoice:
    """The slice of a study the suite uses, and why ('annotation', 'series_map' or 'auto').

    `fallback` says why an automatic choice is not a proper T2 sagittal series (None if it is).
    """

    series: Series
    index: int
    source: str
    fallback: str | None = None

    @property
    def header(self) -> SliceHeader:
        return self.series.slices[self.index]

    @property
    def instance_uid(self) -> str:
        return self.header.instance_uid

    def describe(self) -> str:
        return (
            f"series {self.series.uid} ({self.series.description!r}) "
            f"instance {self.instance_uid} (index {self.index}/{self.series.n_slices})"
        )


def _candidate_tiers(study: Study, exclude: Iterable[str]) -> list[tuple[list[Series], str | None]]:
    """Sagittal non-localizer series in order of preference, each tier with its fallback note."""
    exclude = set(exclude)
    sagittal = [
        s
        for s in study.series
        if s.plane == "sagittal" and s.n_slices > 0 and not s.localizer and s.uid not in exclude
    ]
    enough = [s for s in sagittal if s.n_slices >= MIN_SERIES_SLICES]
    few = [s for s in sagittal if s.n_slices < MIN_SERIES_SLICES]
    few_note = f"fewer than {MIN_SERIES_SLICES} slices"
    return [
        ([s for s in enough if s.weighting == "T2"], None),
        ([s for s in enough if s.weighting != "T2"], "no T2 sagittal series"),
        ([s for s in few if s.weighting == "T2"], f"the T2 sagittal series has {few_note}"),
        ([s for s in few if s.weighting != "T2"], f"no T2 sagittal series; {few_note}"),
    ]


def _auto_series(
    study: Study, reader: PixelReader | None, problems: list[str] | None, exclude: Iterable[str]
) -> tuple[Series | None, str | None]:
    """(series, fallback note) of the automatic choice; decodes only to break ties."""
    for candidates, note in _candidate_tiers(study, exclude):
        if len(candidates) == 1:
            return candidates[0], note
        reader = reader or PixelReader()
        best, best_mean = None, -math.inf
        for s in candidates:
            try:
                mean = float(reader(s.slices[s.middle_index]).mean())
            except DicomFileError as err:
                if problems is not None:
                    problems.append(f"skipped {one_line(err.path)}: {err.reason}")
                continue
            if mean > best_mean:
                best, best_mean = s, mean
        if best is not None:
            return best, note
    return None, None


def t2_sagittal_series(
    study: Study,
    reader: PixelReader | None = None,
    problems: list[str] | None = None,
    exclude: Iterable[str] = (),
) -> Series | None:
    """The T2 sagittal series: highest mean intensity (of the middle slice) among sagittal T2
    series, else among any sagittal series (a fallback); None when there is no sagittal series.

    Localizers are never candidates; series with fewer than `MIN_SERIES_SLICES` slices only
    when nothing else is left. Only when several series compete is anything decoded: the
    middle slice of each. Series whose uid is in `exclude` are not considered.
    """
    return _auto_series(study, reader, problems, exclude)[0]


def auto_choice(
    study: Study,
    reader: PixelReader | None = None,
    problems: list[str] | None = None,
    exclude: Iterable[str] = (),
) -> SliceChoice | None:
    """The automatic choice: middle frame of the T2 sagittal series (a fallback is reported)."""
    series, note = _auto_series(study, reader, problems, exclude)
    if series is None:
        return None
    choice = SliceChoice(series, series.middle_index, "auto", note)
    if note and problems is not None:
        problems.append(
            f"{note}: using {series.weighting} {series.plane} series {series.uid} "
            f"({series.description!r}, {series.n_slices} slices) as a fallback"
        )
    return choice


def _describe_series(study: Study) -> str:
    if not study.series:
        return "none"
    return "; ".join(
        f"{s.description or '<no description>'} ({s.plane}, {s.weighting}, {s.n_slices} slices"
        + (", localizer)" if s.localizer else ")")
        for s in study.series
    )


def _unreadable_instance(study: Study, instance_uid: str) -> str | None:
    """Why an annotated instance that no readable slice holds may still be in the folder: one
    of its unreadable files carries that SOPInstanceUID (read alone, as far as the file allows),
    or files whose UID cannot be read at all could be it. None when no unreadable file can."""
    unknown = []
    for path, reason in study.unreadable.items():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["SOPInstanceUID"])  # fmt: skip
            uid = str(ds.get("SOPInstanceUID", "") or "")
        except Exception:  # noqa: BLE001 - any failure: the UID stays unknown
            uid = ""
        if uid == instance_uid:
            return (
                f"the annotated instance {instance_uid} is {one_line(path)}, which cannot be "
                f"read ({reason})"
            )
        if not uid:
            unknown.append(path)
    if not unknown:
        return None
    return (
        f"annotation names instance {instance_uid}, which no readable slice holds; "
        f"{len(unknown)} unreadable file(s) of this folder (first {one_line(unknown[0])}) may "
        "be it"
    )


def choose_slice(
    study: Study,
    annotation: StudyAnnotation | None = None,
    series_uid: str | None = None,
    reader: PixelReader | None = None,
    compare_auto: bool = False,
    verify: bool = False,
) -> tuple[SliceChoice | None, SliceChoice | None, list[str]]:
    """Pick the slice to use: (choice, automatic choice or None if not computed, problems).

    An annotation naming an existing instance wins, then a series map's `series_uid` (middle
    frame), then the automatic choice. With `compare_auto` the automatic choice is always
    computed and a disagreement with the annotation is reported. With `verify` the chosen
    slice is decoded (through `reader`, so it is decoded once): an automatic choice that
    fails moves on to the next series, a failing annotated slice leaves the study out.
    """
    problems: list[str] = []
    auto: SliceChoice | None = None
    auto_done = False
    if verify and reader is None:
        reader = PixelReader()

    def decodes(choice: SliceChoice) -> bool:
        if not verify:
            return True
        try:
            reader(choice.header)  # type: ignore[misc]
            return True
        except DicomFileError as err:
            problems.append(
                f"skipped {one_line(err.path)}: {err.reason}; the {choice.source} choice "
                f"({choice.describe()}) cannot be used"
            )
            return False

    def get_auto() -> SliceChoice | None:
        nonlocal auto, auto_done
        if not auto_done:
            excluded: list[str] = []
            while True:
                auto = auto_choice(study, reader, problems, excluded)
                if auto is None or decodes(auto):
                    break
                excluded.append(auto.series.uid)
            auto_done = True
        return auto

    choice: SliceChoice | None = None
    left_out = False
    if annotation is not None and annotation.instance_uid:
        found = study.find_instance(annotation.instance_uid)
        if found is not None:
            choice = SliceChoice(found[0], found[1], "annotation")
            if annotation.series_uid and annotation.series_uid != found[0].uid:
                problems.append(
                    f"annotation names series {annotation.series_uid} but instance "
                    f"{annotation.instance_uid} belongs to series {found[0].uid}; using the instance"
                )
            if not decodes(choice):
                # The points belong to that slice: another slice would silently move them.
                problems.append("the annotated slice cannot be decoded; study left out")
                choice, left_out = None, True
        elif (lost := _unreadable_instance(study, annotation.instance_uid)) is not None:
            # The annotated file may be there but unreadable: its points belong to it, and the
            # automatic choice would silently move them onto another slice.
            problems.append(lost + "; study left out")
            left_out = True
        else:
            fallback = get_auto()
            problems.append(
                f"annotation names instance {annotation.instance_uid} (series "
                f"{annotation.series_uid}) which is not in this study folder; falling back to "
                + (
                    f"the automatic choice: {fallback.describe()}"
                    if fallback
                    else "the automatic choice, but there is none"
                )
            )
    if choice is None and series_uid and not left_out:
        series = study.get_series(series_uid)
        if series is not None and series.n_slices:
            choice = SliceChoice(series, series.middle_index, "series_map")
            if not decodes(choice):
                choice = None
                problems.append("using the automatic choice instead of the series map's series")
        else:
            problems.append(
                f"series map names series {series_uid}, not in this study folder; "
                "using the automatic choice"
            )
    if compare_auto or (choice is None and not left_out):
        get_auto()
    if choice is None and not left_out:
        choice = auto
        if choice is None:
            problems.append(
                "no T2 sagittal series (nor any other usable sagittal series; localizers are "
                f"never used); series found: {_describe_series(study)}"
            )
    elif (
        choice is not None
        and compare_auto
        and auto is not None
        and choice.source == "annotation"
        and (auto.instance_uid != choice.instance_uid)
    ):
        problems.append(
            f"annotated slice {choice.describe()} differs from the automatic choice "
            f"{auto.describe()}"
        )
    return choice, auto, problems
