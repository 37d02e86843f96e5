"""The taxonomy: how each source names a cell, its fine (19-type) name, and its class (12).

Everything comes from configs/data/taxonomy.yaml; this module only reads and applies it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from hpcgan import CONFIG_DIR

DEFAULT_TAXONOMY = CONFIG_DIR / "data" / "taxonomy.yaml"
SOURCES = ("pbc", "aml", "lab")


class UnknownCellType(ValueError):
    """A file whose folder or name does not map to any cell type; the message says why."""


@dataclass(frozen=True)
class Resolved:
    source: str        # pbc | aml | lab
    source_label: str  # what the source called it (prefix or folder name)
    fine: str          # one of the 19 types
    cls: str           # one of the 12 classes
    label: int         # index of cls in Taxonomy.classes


def _forgiving_key(name: str) -> frozenset[str]:
    """Case, separators, plurals and word order do not matter: 'Neutrophils_Band' == 'band neutrophil'."""
    words = re.split(r"[\s_\-\.]+", name.strip().lower())
    out = set()
    for w in words:
        if not w:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return frozenset(out)


class Taxonomy:
    def __init__(self, spec: dict):
        self.spec = spec
        self.classes: list[str] = list(spec["classes"])
        self.types: dict[str, str] = dict(spec["types"])
        for fine, cls in self.types.items():
            if cls not in self.classes:
                raise ValueError(f"taxonomy: type {fine!r} maps to unknown class {cls!r}")
        self._label = {c: i for i, c in enumerate(self.classes)}
        src = spec["sources"]
        self._pbc_folders = {k.lower(): v for k, v in src["pbc"]["folders"].items()}
        self._pbc_prefixes = {k.upper(): v for k, v in src["pbc"]["prefixes"].items()}
        self._aml_folders = {k.upper(): v for k, v in src["aml"]["folders"].items()}
        lab = dict(src["lab"]["folders"])
        lab.update(src["lab"].get("aliases") or {})
        self._lab_folders = {_forgiving_key(k): v for k, v in lab.items()}
        for table in (self._pbc_prefixes, self._aml_folders, self._lab_folders):
            for fine in table.values():
                if fine not in self.types:
                    raise ValueError(f"taxonomy: source maps to unknown type {fine!r}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Taxonomy":
        with open(path or DEFAULT_TAXONOMY) as f:
            return cls(yaml.safe_load(f))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label(self, cls_name: str) -> int:
        return self._label[cls_name]

    def _resolved(self, source: str, source_label: str, fine: str) -> Resolved:
        cls = self.types[fine]
        return Resolved(source, source_label, fine, cls, self._label[cls])

    def resolve(self, source: str, rel_path: str | PurePosixPath) -> Resolved:
        """Map a file, given by its path relative to the source root, to its cell type.

        Raises UnknownCellType with a reason a person can act on.
        """
        parts = PurePosixPath(rel_path).parts
        if len(parts) < 2:
            raise UnknownCellType(f"{rel_path}: not inside a class folder")
        folder, name = parts[0], parts[-1]
        if source == "pbc":
            entry = self._pbc_folders.get(folder.lower())
            if entry is None:
                raise UnknownCellType(f"unknown PBC class folder {folder!r}")
            prefix = name.split("_", 1)[0].upper() if "_" in name else ""
            if prefix in self._pbc_prefixes:
                if prefix not in [p.upper() for p in entry["prefixes"]]:
                    raise UnknownCellType(f"prefix {prefix!r} does not belong in PBC folder {folder!r}")
                return self._resolved(source, prefix, self._pbc_prefixes[prefix])
            return self._resolved(source, folder, entry["type"])
        if source == "aml":
            fine = self._aml_folders.get(folder.upper())
            if fine is None:
                raise UnknownCellType(f"unknown AML-Cytomorphology_LMU code folder {folder!r}")
            return self._resolved(source, folder, fine)
        if source == "lab":
            fine = self._lab_folders.get(_forgiving_key(folder))
            if fine is None:
                raise UnknownCellType(f"unknown lab class folder {folder!r}")
            return self._resolved(source, folder, fine)
        raise UnknownCellType(f"unknown source {source!r} (expected one of {SOURCES})")
