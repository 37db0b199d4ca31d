"""Small shared helpers: atomic file writes, choosing from a name map, parsing CSV cells."""

from __future__ import annotations

import difflib
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; read once, at import, before any thread
    os.umask(mask)
    return mask


UMASK = _read_umask()  # the process umask (mkstemp and mkdtemp ignore it)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it 0600; a plain write would not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Atomically write an object as JSON."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def one_line(text: object, limit: int | None = None) -> str:
    """`text` for a one-line message: line breaks and other non-printable characters escaped
    (a newline becomes ``\\n``); cut to `limit` characters (ending in '…') when one is given.

    A whole message is never cut (its remedy comes last); pass a limit for a value quoted
    inside one, such as a user's option or a header field."""
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return s if limit is None or len(s) <= limit else s[: limit - 1] + "…"


def parse_float(text: str) -> float | None:
    """A CSV cell as a finite number, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_int(text: str) -> int | None:
    """A CSV cell as a whole number ("3" or "3.0"), else None."""
    value = parse_float(text)
    return int(value) if value is not None and value == int(value) else None


def choose(name: str, options: Iterable[str], what: str) -> str:
    """Return `name` if it is one of `options`, else raise naming the closest valid choice."""
    options = list(options)
    if name in options:
        return name
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {what} {name!r}{hint}; choose one of: {', '.join(options)}")


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` across processes (the `filelock` package).

    Parallel sweep runs that need the same phantom or cache wait here for the first one to
    build it instead of writing the same files at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(path):
        yield


def git_state(cwd: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit hash, dirty?) of the working tree holding the code, or (None, None) outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
