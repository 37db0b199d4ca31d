"""The task: the 11 keypoints and the two disease-label vocabularies of the spine dataset.

Its own module because both layers need it: `data/` reads and writes these points and labels,
`models/` sizes its heads by them, and `models/` must not import `data/` (docs/architecture.md).
The points and vocabularies are described in docs/data-format.md.

Point order is anatomical, top to bottom, and is the channel order of every heatmap and
every per-point array in the suite. A "class" is a (point type, disease code) pair such as
``disc/v3``; the metric counts one ground-truth instance per class label.
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_spine.utils import choose

POINT_NAMES: tuple[str, ...] = (
    "T12-L1",
    "L1",
    "L1-L2",
    "L2",
    "L2-L3",
    "L3",
    "L3-L4",
    "L4",
    "L4-L5",
    "L5",
    "L5-S1",
)
NUM_POINTS = len(POINT_NAMES)
POINT_INDEX = {name: i for i, name in enumerate(POINT_NAMES)}
VERTEBRA_POINTS: tuple[int, ...] = tuple(i for i, n in enumerate(POINT_NAMES) if "-" not in n)
DISC_POINTS: tuple[int, ...] = tuple(i for i, n in enumerate(POINT_NAMES) if "-" in n)


def is_disc(identification: str) -> bool:
    """A point is a disc when its identification contains '-' (e.g. 'L4-L5')."""
    return "-" in identification


def point_type(identification: str) -> str:
    """'disc' or 'vertebra' for an identification string."""
    return "disc" if is_disc(identification) else "vertebra"


@dataclass(frozen=True)
class Vocabulary:
    """Disease codes per point type, with human-readable meanings."""

    name: str
    vertebra: dict[str, str]
    disc: dict[str, str]

    def codes(self, kind: str) -> tuple[str, ...]:
        """Disease codes for 'vertebra' or 'disc', in order."""
        return tuple(self.vertebra if kind == "vertebra" else self.disc)

    @property
    def classes(self) -> tuple[str, ...]:
        """All metric classes, vertebra classes first: ('vertebra/v1', ..., 'disc/v1', ...)."""
        return tuple(f"vertebra/{c}" for c in self.vertebra) + tuple(f"disc/{c}" for c in self.disc)

    @property
    def num_classes(self) -> int:
        """Number of metric classes (vertebra codes plus disc codes)."""
        return len(self.vertebra) + len(self.disc)

    def class_index(self, kind: str, code: str) -> int:
        """Index into `classes` of a (point type, code) pair; raises ValueError if unknown."""
        codes = self.codes(kind)
        if code not in codes:
            raise ValueError(
                f"unknown {kind} disease code {code!r} for vocabulary {self.name!r}; "
                f"valid codes: {', '.join(codes)}"
            )
        offset = 0 if kind == "vertebra" else len(self.vertebra)
        return offset + codes.index(code)

    def parse(self, kind: str, text: str | None) -> tuple[str, ...]:
        """Parse a comma-joined disease string ('' means v1) into validated codes."""
        parts = [p.strip() for p in (text or "").split(",") if p.strip()]
        if not parts:
            parts = ["v1"]
        for code in parts:
            self.class_index(kind, code)
        return tuple(dict.fromkeys(parts))


VOCABULARIES: dict[str, Vocabulary] = {
    "tianchi2020": Vocabulary(
        name="tianchi2020",
        vertebra={"v1": "normal", "v2": "degenerative change"},
        disc={
            "v1": "normal",
            "v2": "bulge",
            "v3": "protrusion",
            "v4": "extrusion",
            "v5": "Schmorl's node (intravertebral herniation)",
        },
    ),
    "seed7": Vocabulary(
        name="seed7",
        vertebra={"v1": "normal", "v2": "degenerative change"},
        disc={
            "v1": "normal",
            "v2": "degenerative change",
            "v3": "diffuse bulge",
            "v4": "asymmetric bulge",
            "v5": "protrusion",
            "v6": "extrusion",
            "v7": "herniation into the vertebral body",
        },
    ),
}


def get_vocabulary(name: str) -> Vocabulary:
    """Look up a vocabulary by name; a misspelling names the closest valid choice."""
    return VOCABULARIES[choose(name, VOCABULARIES, "vocabulary")]


@dataclass(frozen=True)
class Task:
    """What a model learns: its points (names, order, kind), label vocabularies, series.

    ``point_names`` fix the channel order of heatmaps and per-point arrays; ``point_kinds``
    give each point's kind ('vertebra' or 'disc'); ``vocabularies`` name the label
    vocabularies the task accepts (the first is its default); ``series`` says which series
    of a study the points live on. See docs/datasets.md for the registered tasks and how to
    add one.
    """

    name: str
    point_names: tuple[str, ...]
    point_kinds: tuple[str, ...]
    vocabularies: tuple[str, ...]
    series: str
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.point_names) != len(self.point_kinds):
            raise ValueError(
                f"task {self.name!r}: {len(self.point_names)} point names but "
                f"{len(self.point_kinds)} point kinds"
            )
        bad = sorted(set(self.point_kinds) - {"vertebra", "disc"})
        if bad:
            raise ValueError(f"task {self.name!r}: unknown point kinds {bad}; use vertebra/disc")

    @property
    def num_points(self) -> int:
        """Number of points (heatmap channels)."""
        return len(self.point_names)

    @property
    def point_index(self) -> dict[str, int]:
        """Point name -> channel index."""
        return {n: i for i, n in enumerate(self.point_names)}

    def points_of_kind(self, kind: str) -> tuple[int, ...]:
        """Channel indices of the points of one kind, in order."""
        return tuple(i for i, k in enumerate(self.point_kinds) if k == kind)

    def vocabulary(self, name: str | None = None) -> Vocabulary:
        """The task's vocabulary `name` (default: its first); a foreign one is refused."""
        name = name or self.vocabularies[0]
        vocabulary = get_vocabulary(name)  # an unknown name: "did you mean" the closest one
        if name not in self.vocabularies:
            raise ValueError(
                f"vocabulary {name!r} does not belong to task {self.name!r}; "
                f"choose one of: {', '.join(self.vocabularies)}"
            )
        return vocabulary


# RSNA 2024 spinal canal stenosis severities, in the order of the competition's columns
# (docs/datasets.md). The canal task has disc points only, so its vertebra vocabulary is empty.
RSNA_SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
VOCABULARIES["rsna2024_severity"] = Vocabulary(
    name="rsna2024_severity",
    vertebra={},
    disc={"v1": "Normal/Mild", "v2": "Moderate", "v3": "Severe"},
)
RSNA_LEVELS: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
# Neural foraminal narrowing: the five levels on the left, then on the right; each side's
# points lie on their own parasagittal slices of the Sagittal T1 series.
RSNA_SIDES: tuple[str, ...] = ("left", "right")
RSNA_FORAMINAL_POINTS: tuple[str, ...] = tuple(
    f"{level} {side}" for side in RSNA_SIDES for level in RSNA_LEVELS
)

# SPIDER (van der Graaf et al. 2024): Pfirrmann grade of the five lumbar discs, points from
# the masks on the mid-sagittal slice of the T2 series (docs/datasets.md, "SPIDER").
PFIRRMANN_GRADES: tuple[int, ...] = (1, 2, 3, 4, 5)
VOCABULARIES["spider_pfirrmann"] = Vocabulary(
    name="spider_pfirrmann",
    vertebra={},
    disc={f"v{g}": f"Pfirrmann grade {g}" for g in PFIRRMANN_GRADES},
)

# SPIDER's other gradings as a multi-label disc vocabulary (docs/datasets.md, "The findings
# task"): per disc, `normal` when none of the four findings is graded, else every finding
# that is. The gradings CSV grades discs only, so the vertebra points have one class
# ('vertebra': a localisation target, no finding). Order: the column each code comes from.
SPIDER_FINDINGS: dict[str, str] = {
    "v1": "normal (no Modic change, herniation, bulging or narrowing graded)",
    "v2": "Modic change (Modic type 1-3)",
    "v3": "disc herniation",
    "v4": "disc bulging",
    "v5": "disc narrowing",
}
# A short name per code: the prediction file's columns and `inspect`'s text use it.
SPIDER_FINDING_NAMES: dict[str, str] = {
    "v1": "normal", "v2": "modic", "v3": "herniation", "v4": "bulging", "v5": "narrowing",
}  # fmt: skip
VOCABULARIES["spider_findings"] = Vocabulary(
    name="spider_findings",
    vertebra={"v1": "vertebra (SPIDER grades no vertebra finding)"},
    disc=dict(SPIDER_FINDINGS),
)
# L1, L1/L2, L2, ... L5, L5/S1: anatomical order, top to bottom (the vertebra above its disc).
SPIDER_SPINE_POINTS: tuple[str, ...] = tuple(
    name for k in range(5) for name in (f"L{k + 1}", RSNA_LEVELS[k])
)

# The series a SPIDER patient's points lie on (data/spider.py chooses the file).
SPIDER_SERIES = "sagittal T2 (<patient>_t2.mha, else <patient>_t2_SPACE.mha), mid slice"


def _disc_task(
    name: str, point_names: tuple[str, ...], vocabulary: str, series: str, description: str
) -> Task:
    """A task whose points are all discs, graded in one vocabulary."""
    return Task(
        name=name,
        point_names=point_names,
        point_kinds=("disc",) * len(point_names),
        vocabularies=(vocabulary,),
        series=series,
        description=description,
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="tianchi2020",
            point_names=POINT_NAMES,
            point_kinds=tuple(point_type(n) for n in POINT_NAMES),
            vocabularies=("tianchi2020", "seed7"),
            series="sagittal T2 (mid-sagittal slice)",
            description="2020 challenge: 5 vertebrae L1 .. L5 and 6 discs T12-L1 .. L5-S1",
        ),
        _disc_task(
            "rsna2024_canal",
            RSNA_LEVELS,
            "rsna2024_severity",
            series="Sagittal T2/STIR",
            description="RSNA 2024: spinal canal stenosis at the 5 disc levels L1/L2 .. L5/S1",
        ),
        _disc_task(
            "rsna2024_foraminal",
            RSNA_FORAMINAL_POINTS,
            "rsna2024_severity",
            series="Sagittal T1",
            description="RSNA 2024: left and right neural foraminal narrowing at the 5 disc "
            "levels, each point on its own parasagittal slice",
        ),
        _disc_task(
            "spider_disc",
            RSNA_LEVELS,
            "spider_pfirrmann",
            series=SPIDER_SERIES,
            description="SPIDER: Pfirrmann grade 1-5 of the 5 lumbar discs L1/L2 .. L5/S1",
        ),
        Task(
            name="spider_spine",
            point_names=SPIDER_SPINE_POINTS,
            point_kinds=tuple("disc" if "/" in n else "vertebra" for n in SPIDER_SPINE_POINTS),
            vocabularies=("spider_findings",),
            series=SPIDER_SERIES,
            description="SPIDER: vertebrae L1 .. L5 and discs L1/L2 .. L5/S1 with the disc "
            "findings Modic change, herniation, bulging, narrowing (multi-label; else normal)",
        ),
    )
}


def get_task(name: str) -> Task:
    """Look up a registered task; a misspelling names the closest valid choice."""
    return TASKS[choose(name, TASKS, "task")]
