"""Leakage guard: a synthetic set may feed a classifier only if its GAN never saw an image the classifier is
scored on.

What the GAN saw (`gan_training_data`), from the first of:
  1. the synthetic manifest's `trained_on` ({"shards": DIR or [DIRs], "split": NAME or [NAMES]}), when the
     generator recorded it;
  2. the config inside the checkpoint the manifest names (`checkpoint.path`; hpcgan.train stores its resolved
     settings there: `shards`, `split`);
  3. `config.yaml` of that checkpoint's run directory.
None of them readable: the provenance is unknown.

The rule (`check_synthetic`), for every shard set the GAN trained on:
  * readable here: the content hashes (`sha256` of the original file, in every sample's metadata) of the
    splits the GAN read are compared with those of the real `test` split; any image in both is refused,
    naming how many. This catches the same shard set with the test split included, and another shard set
    built from the same sources (e.g. at another size, or with test_fraction=0) that holds test images.
  * not readable (moved, another machine): it is the classifier's own shard set when its path is the real
    shards' path, and then refused if the GAN read the test split; any other set cannot be checked.
Unknown provenance or an uncheckable shard set is refused unless `allow_unknown_provenance=true`, which is
recorded in the results. Under a scarce cut (hpcgan.data.scarce) the GAN must have trained on the same cut
or a stricter one (`scarce_problem`): the classifier's shard set, train split only, every scarce class cut to
at most the classifier's N with the same seed; anything else is refused whatever allow_unknown_provenance says.
Only the test split's metadata is read here, never its images.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch

from hpcgan.data.shards import read_manifest, shard_paths

SCORED_SPLIT = "test"


class LeakageError(ValueError):
    """The synthetic set's GAN saw scored images, or what it saw is unknown; the message says which."""


def content_hashes(shard_dir: str | Path, splits) -> set[str]:
    """The `sha256` metadata of every sample of `splits` in a shard set (JSON members only, images skipped)."""
    found = set()
    for split in ([splits] if isinstance(splits, str) else splits):
        for tar in shard_paths(shard_dir, split):
            with tarfile.open(tar, "r:") as tf:
                for m in tf:
                    if m.name.endswith(".json"):
                        meta = json.loads(tf.extractfile(m).read())
                        if meta.get("sha256"):
                            found.add(str(meta["sha256"]))
    return found


def _as_list(v) -> list:
    return [] if v is None else [v] if isinstance(v, (str, Path)) else list(v)


def _from_config(cfg: dict | None, where: str) -> dict | None:
    if not cfg or not cfg.get("shards"):
        return None
    return {"shards": [str(p) for p in _as_list(cfg["shards"])], "splits": _as_list(cfg.get("split", "train")),
            "scarce": cfg.get("scarce") or None, "scarce_seed": cfg.get("scarce_seed", cfg.get("seed")),
            "from": where}


def gan_training_data(manifest: dict) -> dict | None:
    """{"shards": [dirs], "splits": [names], "scarce", "from"} of the GAN behind a synthetic manifest, or None."""
    found = _from_config(manifest.get("trained_on"), "manifest trained_on")
    if found:
        return found
    ckpt = Path(str((manifest.get("checkpoint") or {}).get("path") or ""))
    if ckpt.name and ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            found = _from_config(state.get("config") if isinstance(state, dict) else None, f"checkpoint {ckpt}")
        except Exception:  # noqa: BLE001 - unreadable: try the run's config.yaml
            found = None
        if found:
            return found
    if ckpt.name and (ckpt.parent.parent / "config.yaml").is_file():
        from hpcgan.rundir import read_config
        return _from_config(read_config(ckpt.parent.parent), f"{ckpt.parent.parent / 'config.yaml'}")
    return None


def check_synthetic(real: str | Path, synthetic: str | Path, allow_unknown: bool = False,
                    scarce: dict[str, int] | None = None, scarce_seed: int = 0) -> dict:
    """The provenance record of `synthetic` for the results; LeakageError when its GAN saw images of `real`'s
    test split, or more of a scarce class than the classifier's cut (`scarce`, `scarce_seed`), or when that
    cannot be ruled out (unless allow_unknown)."""
    manifest = read_manifest(synthetic)
    seen = gan_training_data(manifest)
    if seen is not None and scarce:
        problem = scarce_problem(real, seen, scarce, scarce_seed)
        if problem:
            raise LeakageError(f"{synthetic}: {problem}; train the GAN on the same scarce cut "
                               "(the same scarce= and seed, train split only)")
    record = {"gan": seen, "checkpoint": manifest.get("checkpoint"), "model": manifest.get("model"),
              "checked": [], "unchecked": []}
    if seen is None:
        if not allow_unknown:
            raise LeakageError(f"{synthetic}: its manifest does not say what its GAN was trained on (no trained_on, "
                               f"and the checkpoint {record['checkpoint']} and its run's config.yaml are not "
                               "readable here), so it could have seen the test images. Make the GAN's run "
                               "directory readable, or pass allow_unknown_provenance=true to use it anyway "
                               "(recorded in the results)")
        record["unknown"] = True
        return record
    real = Path(real).resolve()
    scored: set[str] | None = None
    for d in map(Path, seen["shards"]):
        if (d / "manifest.json").is_file() and read_manifest(d).get("synthetic"):
            record["checked"].append({"shards": str(d), "synthetic": True})  # a GAN fed synthetic images
            continue
        if (d / "manifest.json").is_file():
            scored = content_hashes(real, SCORED_SPLIT) if scored is None else scored
            overlap = scored & content_hashes(d, seen["splits"])
            if overlap:
                raise LeakageError(
                    f"{synthetic}: its GAN trained on {d} split(s) {seen['splits']}, which hold {len(overlap)} of "
                    f"the {len(scored)} images of {real}'s {SCORED_SPLIT} split the classifier is scored on; "
                    f"train the GAN on the classifier's train (and val) split only")
            record["checked"].append({"shards": str(d), "splits": seen["splits"], "overlap": 0})
        elif d.resolve() == real:
            if SCORED_SPLIT in seen["splits"]:
                raise LeakageError(f"{synthetic}: its GAN trained on the {SCORED_SPLIT} split of {real}, the split "
                                   "the classifier is scored on")
            record["checked"].append({"shards": str(d), "splits": seen["splits"], "by": "path and split names"})
        else:
            record["unchecked"].append(str(d))
    if record["unchecked"] and not allow_unknown:
        raise LeakageError(f"{synthetic}: its GAN trained on {record['unchecked']}, which is not readable here, so "
                           f"its overlap with {real}'s {SCORED_SPLIT} split cannot be checked; make it readable or "
                           "pass allow_unknown_provenance=true (recorded in the results)")
    return record


def scarce_problem(real: str | Path, seen: dict, scarce: dict[str, int], seed: int) -> str | None:
    """Why a GAN that saw `seen` may have seen more of a scarce class than the classifier's cut allows, or None.

    Its own cut must be at least as strict: only the train split, of the classifier's shard set, each scarce
    class cut to at most the classifier's N with the same seed (the cut is nested, so its images are then among
    the classifier's)."""
    gan_cut, gan_seed = seen.get("scarce") or {}, seen.get("scarce_seed")
    if list(seen["splits"]) != ["train"]:
        return f"its GAN read the splits {seen['splits']}, but under a scarce cut only the cut train split may be read"
    if [str(Path(d).resolve()) for d in seen["shards"]] != [str(Path(real).resolve())]:
        return f"its GAN trained on {seen['shards']}, not on {real}, whose scarce cut the classifier uses"
    for name, n in scarce.items():
        if name not in gan_cut:
            return f"its GAN saw every {name} image of the train split; the classifier is allowed {n}"
        if int(gan_cut[name]) > int(n):
            return f"its GAN saw {gan_cut[name]} {name} images; the classifier is allowed {n}"
    if gan_seed is None or int(gan_seed) != int(seed):
        return f"its GAN's scarce cut has seed {gan_seed}, the classifier's {seed}: other images"
    return None
