"""hpcgan.data.shards.write_manifest: the one writer of manifest.json, which checks the contract fields."""
import json

import pytest

from hpcgan.data.shards import FORMAT, MANIFEST, ManifestError, read_manifest, write_manifest

CLASSES = ["a", "b"]


def good(**kw) -> dict:
    m = {"classes": CLASSES, "image_size": 32, "counts": {"train": {"a": 3, "b": 1}, "val": {"a": 0, "b": 0}},
         "shards": {"train": [{"name": "train-000000.tar", "count": 3}, {"name": "train-000001.tar", "count": 1}],
                    "val": []},
         "synthetic": False, "settings": {"seed": 0}}
    return {**m, **kw}


def test_writes_fills_format_and_round_trips(tmp_path):
    written = write_manifest(tmp_path, good())
    assert list(written)[0] == "format" and written["format"] == FORMAT == 1
    assert read_manifest(tmp_path) == written == {"format": 1, **good()}
    assert (tmp_path / MANIFEST).read_text() == json.dumps(written, indent=2) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]   # written atomically, no temp file left
    unlabelled = write_manifest(tmp_path, good(counts={}, shards={}))  # e.g. unconditional synthetic PNGs
    assert unlabelled["counts"] == {} and read_manifest(tmp_path) == unlabelled


@pytest.mark.parametrize("change, words", [
    ({"classes": None}, ["classes"]),
    ({"classes": ["a", "a"]}, ["classes", "unique"]),
    ({"classes": []}, ["classes"]),
    ({"image_size": 256}, ["image_size=256", "32, 64 or 128"]),
    ({"counts": {"train": {"a": 3, "c": 1}}}, ["counts['train']", "class"]),
    ({"counts": {"train": {"a": -1, "b": 1}}}, ["counts['train']", ">= 0"]),
    ({"shards": {"train": [{"name": "train-000000.tar", "count": 3}]}}, ["hold 3 samples", "add up to 4"]),
    ({"shards": {"train": [{"count": 4}]}}, ["name and a count"]),
    ({"format": 2}, ["format=2"]),
])
def test_refuses_what_breaks_the_contract(tmp_path, change, words):
    m = good(**change)
    if m["classes"] is None:
        del m["classes"]
    with pytest.raises(ManifestError) as e:
        write_manifest(tmp_path, m)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / MANIFEST).exists()
