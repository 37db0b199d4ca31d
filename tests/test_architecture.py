"""The package's layers import in one direction (docs/architecture.md): `models/` never `data/`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "lit_spine" / "models"


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a source file imports, anywhere in it (lazy imports in functions too),
    with relative imports resolved against the file's package."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_import_scanner_sees_every_form(tmp_path):
    # The checker below must be able to fail: each import form of data/ is detected.
    pkg = tmp_path / "lit_spine" / "models"
    pkg.mkdir(parents=True)
    probe = pkg / "probe.py"
    probe.write_text(
        "import lit_spine.data.cache\n"
        "from lit_spine.data import labels\n"
        "from ..data.targets import gaussian_heatmaps\n"
        "def f():\n    from lit_spine.data.dicom import read_study\n"
    )
    found = imported_modules(probe, root=tmp_path)
    assert {
        "lit_spine.data.cache",
        "lit_spine.data.labels",
        "lit_spine.data.targets",
        "lit_spine.data.dicom",
    } <= found


def test_models_source_never_imports_data():
    sources = sorted(MODELS.rglob("*.py"))
    assert len(sources) >= 6  # norms, drops, backbones, heads, net, summary at least
    offenders = {
        src.relative_to(ROOT).as_posix(): sorted(
            m
            for m in imported_modules(src)
            if m == "lit_spine.data" or m.startswith("lit_spine.data.")
        )
        for src in sources
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_models_loads_no_data_module():
    # Transitively too: nothing models/ imports (utils, task, ...) pulls the data layer in.
    code = (
        "import sys, pkgutil, importlib, lit_spine.models as m\n"
        "for info in pkgutil.iter_modules(m.__path__):\n"
        "    importlib.import_module(f'lit_spine.models.{info.name}')\n"
        "print(sorted(k for k in sys.modules if k.startswith('lit_spine.data')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_labels_module_still_re_exports_the_task():
    import lit_spine.data.labels as labels
    import lit_spine.task as task

    for name in labels.__all__:
        assert getattr(labels, name) is getattr(task, name)
    assert labels.get_vocabulary("seed7").num_classes == 9
