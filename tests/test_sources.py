"""hpcgan.data.sources: every file under a source root is either a candidate or a rejection with a reason."""
from __future__ import annotations

import os

import pytest

from hpcgan.data.sources import SourceError, walk_source
from hpcgan.data.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def tax():
    return Taxonomy.load()


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_every_file_is_accounted_for(tmp_path, tax):
    root = tmp_path / "lab"
    touch(root / "Neutrophils_Band" / "b.png")
    touch(root / "Neutrophils_Band" / "a.png")
    touch(root / "smudge" / "s.tif")
    touch(root / "Macrophage" / "m.png")               # not a type the taxonomy knows
    touch(root / "smudge" / ".DS_Store")
    touch(root / "README.md")
    touch(root / "loose.png")                          # not inside a class folder
    os.symlink(root / "smudge" / "s.tif", root / "smudge" / "link.tif")
    os.symlink(tmp_path / "nowhere.png", root / "smudge" / "broken.png")
    os.symlink(root, root / "smudge" / "loop")         # directory loop
    files, rejected = walk_source("lab", root, tax)

    assert [f.rel for f in files] == ["Neutrophils_Band/a.png", "Neutrophils_Band/b.png",
                                      "smudge/link.tif", "smudge/s.tif"]
    assert [f.resolved.fine for f in files] == ["neutrophil band"] * 2 + ["smudge cell"] * 2
    assert files[0].path == "lab/Neutrophils_Band/a.png"
    reasons = {r.path: r.reason for r in rejected}
    assert set(reasons) == {"lab/Macrophage/m.png", "lab/smudge/.DS_Store", "lab/README.md",
                            "lab/loose.png", "lab/smudge/broken.png", "lab/smudge/loop"}
    assert "unknown lab class folder" in reasons["lab/Macrophage/m.png"]
    assert "not inside a class folder" in reasons["lab/loose.png"]
    assert reasons["lab/smudge/broken.png"].startswith("broken symlink")
    assert "loop" in reasons["lab/smudge/loop"]
    ignored = {r.path for r in rejected if r.ignored}
    assert ignored == {"lab/smudge/.DS_Store", "lab/README.md"}


def test_pbc_prefixes_and_aml_codes(tmp_path, tax):
    pbc = tmp_path / "pbc"
    for rel in ["ig/PMY_1.jpg", "ig/MY_2.jpg", "ig/MMY_3.jpg", "ig/IG_4.jpg", "neutrophil/BNE_5.jpg",
                "neutrophil/SNE_6.jpg", "platelet/PLATELET_7.jpg", "basophil/LY_8.jpg"]:
        touch(pbc / rel)
    files, rejected = walk_source("pbc", pbc, tax)
    got = {f.rel: (f.resolved.fine, f.resolved.cls) for f in files}
    assert got["ig/PMY_1.jpg"] == ("promyelocyte", "promyelocyte")
    assert got["ig/MY_2.jpg"] == ("myelocyte", "immature granulocyte")
    assert got["ig/MMY_3.jpg"] == ("metamyelocyte", "immature granulocyte")
    assert got["neutrophil/BNE_5.jpg"] == ("neutrophil band", "neutrophil")
    assert [r.path for r in rejected] == ["pbc/basophil/LY_8.jpg"]   # prefix from another folder

    aml = tmp_path / "aml"
    touch(aml / "KSC" / "KSC_0001.tiff")
    touch(aml / "XYZ" / "XYZ_0001.tiff")
    files, rejected = walk_source("aml", aml, tax)
    assert [(f.resolved.cls, f.resolved.label) for f in files] == [("smudge cell", tax.label("smudge cell"))]
    assert "XYZ" in rejected[0].reason


def test_missing_or_non_directory_source_is_an_error(tmp_path, tax):
    with pytest.raises(SourceError, match="does not exist"):
        walk_source("pbc", tmp_path / "nope", tax)
    with pytest.raises(SourceError, match="not a directory"):
        walk_source("pbc", touch(tmp_path / "file"), tax)
    with pytest.raises(SourceError, match="unknown source"):
        walk_source("imagenet", tmp_path, tax)
