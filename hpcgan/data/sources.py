"""Walk the cell-image sources (PBC, AML-Cytomorphology_LMU, a lab's own folders).

Every file under a source root ends up either as a `SourceFile` to decode or as a `Rejection`
with a reason a person can act on: nothing is silently dropped.

Decisions (documented in configs/shard.yaml too):
- Hidden files ('.DS_Store', '._x.jpg') and files without an image extension (README.md, notes.txt)
  are *ignored*: listed in rejected.csv with a reason starting 'ignored:', but not bad input,
  so `on_bad=strict` does not fail on them.
- Symlinked files are followed (labs often assemble datasets from links into raw storage);
  a broken link is rejected. Symlinked directories are followed once (loops are cut).
- Paths are POSIX, relative to the source root; the sample's `path` is '{source}/{rel}'.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hpcgan.data.taxonomy import SOURCES, Resolved, Taxonomy, UnknownCellType

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")
IGNORED_PREFIX = "ignored: "


class SourceError(ValueError):
    """A source as a whole is unusable (missing directory, not a directory, nothing in it)."""


@dataclass(frozen=True)
class SourceFile:
    source: str
    root: str       # absolute source root
    rel: str        # POSIX path relative to root
    resolved: Resolved

    @property
    def path(self) -> str:
        return f"{self.source}/{self.rel}"

    @property
    def abspath(self) -> str:
        return os.path.join(self.root, *PurePosixPath(self.rel).parts)


@dataclass(frozen=True)
class Rejection:
    path: str       # '{source}/{rel}'
    source: str
    reason: str

    @property
    def ignored(self) -> bool:
        return self.reason.startswith(IGNORED_PREFIX)


def _walk_files(root: Path):
    """Yield (rel_posix, abspath, is_dir_symlink_loop) for every non-directory entry, sorted."""
    seen_dirs = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if real in seen_dirs:
                rel = Path(full).relative_to(root).as_posix()
                yield rel, full, "symlinked directory loop (already walked), not followed"
                continue
            seen_dirs.add(real)
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            yield Path(full).relative_to(root).as_posix(), full, None


def _precheck(rel: str, full: str) -> str | None:
    """A reason to set the file aside before decoding, or None."""
    name = PurePosixPath(rel).name
    if any(p.startswith(".") for p in PurePosixPath(rel).parts):
        return IGNORED_PREFIX + "hidden file"
    if os.path.islink(full) and not os.path.exists(full):
        return f"broken symlink -> {os.readlink(full)}"
    if not os.path.isfile(full):
        return "not a regular file (device, FIFO or socket)"
    if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
        return IGNORED_PREFIX + f"not an image file name (suffix {PurePosixPath(name).suffix or 'none'!r})"
    return None


def walk_source(source: str, root: str | Path, taxonomy: Taxonomy) -> tuple[list[SourceFile], list[Rejection]]:
    """All files of one source, mapped through the taxonomy, in sorted path order."""
    if source not in SOURCES:
        raise SourceError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    root = Path(root).expanduser()
    if not root.exists():
        raise SourceError(f"{source}={root}: directory does not exist")
    if not root.is_dir():
        raise SourceError(f"{source}={root}: not a directory")
    root = root.resolve()
    files: list[SourceFile] = []
    rejected: list[Rejection] = []
    for rel, full, problem in _walk_files(root):
        path = f"{source}/{rel}"
        reason = problem or _precheck(rel, full)
        if reason is None:
            try:
                files.append(SourceFile(source, str(root), rel, taxonomy.resolve(source, rel)))
                continue
            except UnknownCellType as e:
                reason = f"unknown cell type: {e}"
        rejected.append(Rejection(path, source, reason))
    return files, rejected
