"""A study from its file: configs/study/<name>.yaml (with its cluster file) composed by Hydra with command-line
overrides, into StudySettings (hpcgan.sweep.settings, whose schema checks it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from hpcgan import CONFIG_DIR
from hpcgan.settings import SettingsError, override_key, parse
from hpcgan.sweep.settings import StudySettings, check_grid


def _add_or_set(override: str) -> str:
    """`a.b=v` as Hydra's add-or-override (`++a.b=v`), so a key the study file does not spell out (a stage's
    `resources.train.gpus`, a model's overrides) can be given like any other; a wrong key is still refused,
    by the schema. Top-level keys (config groups such as cluster=NAME) are left as they are."""
    key = override.split("=", 1)[0]
    return f"++{override}" if "." in key and not key.startswith(("+", "~")) else override


# Settings that select the data: given on the command line they replace the study's value (a cut of basophil
# alone is that cut, not the study's plus basophil); every other mapping (resources, ...) merges as Hydra does.
REPLACED_KEYS = ("data.scarce", "data.sources")


def load_study(name: str, overrides: Iterable[str] = ()) -> StudySettings:
    """configs/study/<name>.yaml (with its cluster file) + Hydra overrides -> StudySettings. `~KEY` removes a
    key (its schema default applies); REPLACED_KEYS are replaced, not merged."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not (CONFIG_DIR / "study" / f"{name}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "study").glob("*.yaml")))
        raise SettingsError(f"study={name}: no configs/study/{name}.yaml (studies: {known})")
    overrides = list(overrides)
    after = [o for o in overrides if o.startswith("~") or override_key(o) in REPLACED_KEYS]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(f"study/{name}", overrides=[_add_or_set(o) for o in overrides if o not in after])
        _replace_or_remove(cfg, after)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise SettingsError(" ".join(str(e).split("\nSee https://")[0].split())) from None
    from omegaconf import OmegaConf
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # (a ??? in the study file: merged into the schema it would silently keep the default)
        raise SettingsError(f"study {name}: {', '.join(missing)} required: pass " + " ".join(f"{k}=..." for k in missing))
    study = parse(StudySettings, cfg)
    manifests = _manifests(study)
    _check_cut_classes(study, manifests)
    _check_more_real(study, manifests)
    _check_top_up(study, manifests)
    return study


def _manifests(s: StudySettings) -> list[tuple[Path, dict]]:
    """(directory, manifest) of each of data.shards' shard sets that exists already."""
    shards = s.data.shards
    paths = (list(shards.values()) if isinstance(shards, dict) else
             [str(shards).replace("{size}", str(z)) for z in s.gan.sizes] if shards else [])
    return [(Path(p), json.loads((Path(p) / "manifest.json").read_text())) for p in paths
            if (Path(p) / "manifest.json").is_file()]


def _check_cut_classes(s: StudySettings, manifests) -> None:
    """The cut's classes are the shards' (their manifest) or, before the shards exist, the taxonomy's that
    tools/shard.py will use: a misspelt class fails here, not at the study's first GAN."""
    from hpcgan.data.scarce import unknown_classes
    from hpcgan.data.taxonomy import Taxonomy
    if not s.data.scarce:
        return
    taxonomy = next((o.split("=", 1)[1] for o in s.data.shard if o.startswith("taxonomy=")), None)
    classes = manifests[0][1]["classes"] if manifests else Taxonomy.load(taxonomy or None).classes
    problem = unknown_classes(s.data.scarce, classes)
    if problem:
        raise SettingsError(f"data.{problem} (a class with a space on the command line: "
                            r"data.scarce={immature\ granulocyte: 20})")
    _check_train_counts(manifests, s.data.scarce, "data.scarce cuts a class to more images")


def _check_train_counts(manifests, wanted: dict[str, int], asks: str) -> None:
    """SettingsError, beginning with `asks`, when a class of `wanted` ({class: images}) asks more images than the
    train split of a shard set in `manifests` has."""
    for path, manifest in manifests:
        have = manifest.get("counts", {}).get("train", {})
        over = {c: f"{n} > {have.get(c, 0)}" for c, n in wanted.items() if n > have.get(c, 0)}
        if over:
            raise SettingsError(f"{asks} than {path}'s train split has ({over}): give each at most its count")


def _check_more_real(s: StudySettings, manifests) -> None:
    """classify.more_real (the rival search's winner with the cut classes at N real cells; the cut is nested, so
    the cut's cells and N - cut more of the same pool): each N above every cut class's count and at most its
    train count (data.shards' manifest, when it exists), none repeated."""
    more, cut = s.classify.more_real, s.data.scarce or {}
    if not more or not s.classify.enabled:
        return
    if not cut:
        raise SettingsError("classify.more_real: the study cuts no class (data.scarce is empty), so there is no cut "
                            "class to give more real cells")
    check_grid("classify", more_real=more)
    for n in more:
        low = [name for name, k in cut.items() if int(n) <= int(k)]
        if low:
            raise SettingsError(f"classify.more_real: {n} is not above the cut of {low} (data.scarce {cut}); give "
                                "counts above every cut class's")
    _check_train_counts(manifests, {c: max(more) for c in cut}, "classify.more_real asks more images of a cut class")


def _check_top_up(s: StudySettings, manifests) -> None:
    """Sets of generate.per_class images of every class cannot top a class up by more than that: refused here when
    data.shards' manifest gives the train split's counts (else the classifiers find it, after the GANs)."""
    from hpcgan.classify.regimes import get_regime
    regimes = [get_regime(r) for r in [*s.classify.regimes, *s.classify.on_rival]]
    if s.generate.per_class is None or not s.classify.enabled or not any(
            r.data == "real+synthetic" and r.synthetic_count == "topup" for r in regimes):
        return
    for path, manifest in manifests:
        counts = manifest["counts"]["train"]
        real = {c: min(n, (s.data.scarce or {}).get(c, n)) for c, n in counts.items() if n > 0}
        need = max(real.values()) - min(real.values())
        if need > s.generate.per_class:
            raise SettingsError(
                f"generate.per_class={s.generate.per_class}: a top-up regime needs up to {need} synthetic images "
                f"of a class ({path}: largest train class {max(real.values())}, smallest after the cut "
                f"{min(real.values())}); set generate.per_class={need} or more")


def _replace_or_remove(cfg, overrides: list[str]) -> None:
    """Apply `~KEY` (remove) and `KEY=VALUE` (replace whole) overrides to the composed study, in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict
    parser = OverridesParser.create()
    with open_dict(cfg):
        for o in overrides:
            key = override_key(o)
            if not _schema_has(StudySettings, key.split(".")):
                raise SettingsError(f"{o}: the study has no key {key}")
            if o.startswith("~"):
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if node is not None and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(cfg, key, parser.parse_override(o.lstrip("+")).value(), merge=False)


def _schema_has(cls, path: list[str]) -> bool:
    """Whether the dotted path names a field of dataclass `cls` (a mapping field takes any key below it)."""
    import dataclasses
    import typing
    if not dataclasses.is_dataclass(cls):
        return True
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if path[0] not in fields:
        return False
    hints = typing.get_type_hints(cls)
    return len(path) == 1 or _schema_has(hints[path[0]], path[1:])
