"""DICOM study reading: index headers without pixels, group series, choose the annotated slice.

A dataset root holds one folder per study (``<root>/<split>/study<N>/*.dcm``, all series
mixed, file names arbitrary; see ``docs/data-format.md``). Reading happens in two steps:
`index_dataset` reads every header through one routine, `read_header`, and groups slices
into series and studies; `choose_slice` picks the slice to use and decodes only what the
choice needs through a `PixelReader`. One module per concept:

- `limits`: the tags read, every threshold a usable file must meet, the errors;
- `header`: reading and validating one header without its pixels (`read_header`);
- `series`: grouping into series and studies, plane, weighting, localizers (`index_dataset`);
- `pixels`: decoding one slice, surviving any decoder failure (`decode_pixels`, `PixelReader`);
- `choice`: the annotated slice of a study (`choose_slice`, `t2_sagittal_series`);
- `side_files`: the annotation and series-map files beside a split folder.

This package's namespace is the public interface: import from ``lit_spine.data.dicom``.
Parsing and decoding are pydicom's (`pydicom.dcmread`, `pydicom.pixels.pixel_array`,
`apply_modality_lut`); what no library does is written by hand and says so in its module.
"""

from __future__ import annotations

from lit_spine.data.dicom.choice import (
    SliceChoice,
    auto_choice,
    choose_slice,
    t2_sagittal_series,
)
from lit_spine.data.dicom.header import (
    SliceHeader,
    implausible_spacing,
    read_header,
    read_pixel_spacing,
    validate_spacing,
)
from lit_spine.data.dicom.limits import (
    ALLOWED_BITS_ALLOCATED,
    DEFER_SIZE_BYTES,
    HEADER_TAGS,
    LOCALIZER_WORDS,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_HEADER_READS,
    MAX_MATRIX_PX,
    MAX_PIXEL_EXCESS,
    MAX_SPACING_ASPECT,
    MAX_ZERO_READS,
    MIN_FILE_BYTES,
    MIN_MATRIX_PX,
    MIN_SERIES_SLICES,
    NOT_DICOM_SUFFIXES,
    PLANE_THRESHOLD,
    SPACING_RANGE_MM,
    T1_MAX_ECHO_MS,
    T1_MAX_REPETITION_MS,
    T2_MIN_ECHO_MS,
    T2_MIN_REPETITION_MS,
    DatasetError,
    DicomFileError,
    SpacingError,
)
from lit_spine.data.dicom.pixels import (
    PixelReader,
    decode_pixels,
)
from lit_spine.data.dicom.series import (
    DEFAULT_WORKERS,
    Series,
    Study,
    StudyIndex,
    classify_plane,
    classify_weighting,
    classify_weighting_by_timing,
    index_dataset,
    index_study,
    instance_spacing,
    read_spacing_for_instances,
    study_folders,
)
from lit_spine.data.dicom.side_files import (
    find_annotation,
    find_series_map,
    find_side_file,
    load_series_map,
    unknown_annotation_studies,
    unknown_side_file_studies,
)

__all__ = [
    "ALLOWED_BITS_ALLOCATED",
    "DEFAULT_WORKERS",
    "DEFER_SIZE_BYTES",
    "DatasetError",
    "DicomFileError",
    "HEADER_TAGS",
    "LOCALIZER_WORDS",
    "MAX_FRAMES",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_READS",
    "MAX_MATRIX_PX",
    "MAX_PIXEL_EXCESS",
    "MAX_SPACING_ASPECT",
    "MAX_ZERO_READS",
    "MIN_FILE_BYTES",
    "MIN_MATRIX_PX",
    "MIN_SERIES_SLICES",
    "NOT_DICOM_SUFFIXES",
    "PLANE_THRESHOLD",
    "PixelReader",
    "SPACING_RANGE_MM",
    "Series",
    "SliceChoice",
    "SliceHeader",
    "SpacingError",
    "Study",
    "StudyIndex",
    "T1_MAX_ECHO_MS",
    "T1_MAX_REPETITION_MS",
    "T2_MIN_ECHO_MS",
    "T2_MIN_REPETITION_MS",
    "auto_choice",
    "choose_slice",
    "classify_plane",
    "classify_weighting",
    "classify_weighting_by_timing",
    "decode_pixels",
    "find_annotation",
    "find_series_map",
    "find_side_file",
    "implausible_spacing",
    "index_dataset",
    "index_study",
    "instance_spacing",
    "load_series_map",
    "read_header",
    "read_pixel_spacing",
    "read_spacing_for_instances",
    "study_folders",
    "t2_sagittal_series",
    "unknown_annotation_studies",
    "unknown_side_file_studies",
    "validate_spacing",
]
