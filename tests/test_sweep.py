"""Studies (hpcgan/sweep/, tools/sweep.py): grid expansion and run-directory names, dependency planning,
the run-directory lock, and the tiny study end to end, here (executor=local) and on the real local Slurm
(executor=slurm): a second launch starts no duplicates, a task cancelled with scancel shows as failed, and a
relaunch completes it without touching what had finished."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from hpcgan import CONFIG_DIR, REPO_ROOT
from hpcgan.settings import SettingsError
from hpcgan.sweep import (ClusterSettings, TaskError, TaskFiles, collect_status, command, expand, finished,
                          hydra_value, load_study, plan_arrays, read_study, study_summary)

SWEEP = [sys.executable, str(REPO_ROOT / "tools" / "sweep.py")]
HAVE_CLASSIFY = (REPO_ROOT / "tools" / "classify.py").is_file()


def names(tasks, stage=None):
    return [t.name for t in tasks if stage is None or t.stage == stage]


# ---------------------------------------------------------------- the grid (pure, fast)

def test_tiny_study_expands_into_named_tasks_with_dependencies(tmp_path):
    tasks = expand(load_study("tiny"), tmp_path)
    assert names(tasks) == [
        "data/sim", "data/shards-32", "data/cell-32", "gan/wgan_gp_ac-s0-32", "gan/dcgan-s0-32",
        "synthetic/wgan_gp_ac-s0-32", "eval/wgan_gp_ac-s0-32", "eval/dcgan-s0-32",
        "cls/small_cnn-original-s0-32", "cls/small_cnn-original+synthetic-wgan_gp_ac-s0-32"]
    by = {t.name: t for t in tasks}
    assert by["data/shards-32"].deps == ["data/sim"]
    assert by["gan/dcgan-s0-32"].deps == ["data/shards-32"]
    assert by["eval/dcgan-s0-32"].deps == ["gan/dcgan-s0-32", "data/cell-32"]
    assert by["cls/small_cnn-original-s0-32"].deps == ["data/shards-32"]
    assert by["cls/small_cnn-original+synthetic-wgan_gp_ac-s0-32"].deps == ["data/shards-32", "synthetic/wgan_gp_ac-s0-32"]
    # run directories named by the grid values, commands of the stages' own entry points
    train = by["gan/dcgan-s0-32"]
    assert train.out == str(tmp_path / "gan" / "dcgan-s0-32")
    assert train.argv[:2] == ["-m", "hpcgan.train"]
    assert {f"run_dir={tmp_path / 'gan' / 'dcgan-s0-32'}", "model=dcgan", "seed=0", "steps=4",
            f"shards={tmp_path / 'data' / 'shards-32'}"} <= set(train.argv)
    ev = by["eval/dcgan-s0-32"].argv
    assert "metrics=[fid,prdc,is,nn_fidelity]" in ev and f"cache_dir={tmp_path / 'cache'}" in ev
    assert f"feature_file={tmp_path / 'cache' / 'cell-32.pt'}" in ev
    cls = by["cls/small_cnn-original+synthetic-wgan_gp_ac-s0-32"].argv
    assert f"synthetic={tmp_path / 'synthetic' / 'wgan_gp_ac-s0-32'}" in cls and "regime=original+synthetic" in cls
    assert not any(a.startswith("synthetic=") for a in by["cls/small_cnn-original-s0-32"].argv)
    # every dependency is a task of the study, and comes in an earlier stage
    order = {t.name: i for i, t in enumerate(tasks)}
    assert all(order[d] < order[t.name] for t in tasks for d in t.deps)
    assert expand(load_study("tiny"), tmp_path) == tasks   # deterministic


def test_paper_study_grid_sizes_and_resources(tmp_path):
    with pytest.raises(SettingsError, match="data.shards required"):
        load_study("paper")
    s = load_study("paper", ["data.shards=/data/real128"])
    tasks = expand(s, tmp_path)
    count = {st: len(names(tasks, st)) for st in ("simulate", "shard", "features", "train", "generate", "evaluate",
                                                     "classify")}
    # 8 GANs x 3 seeds; WGAN-GP-AC's 3 synthetic sets; 5 archs x (5 real-only + 1 synthetic regime) x 3 seeds
    assert count == {"simulate": 0, "shard": 0, "features": 1, "train": 24, "generate": 3, "evaluate": 24,
                     "classify": 90}
    assert len(set(names(tasks))) == len(tasks)
    assert "cls/resnet50-original+synthetic-wgan_gp_ac-s2-128" in names(tasks)
    train = next(t for t in tasks if t.stage == "train")
    assert train.resources["gpus"] == 1 and train.resources["ranks"] == 1 and train.resources["time_min"] == 720
    assert "steps=" not in " ".join(train.argv)   # the paper's 50 epochs
    two = expand(load_study("paper", ["data.shards={64: /d/r64, 128: /d/r128}", "gan.sizes=[64,128]"]), tmp_path)
    assert "shards=/d/r64" in next(t for t in two if t.name == "gan/dcgan-s1-64").argv


def test_study_configs_of_the_quality_and_scarcity_studies_expand(tmp_path):
    q = expand(load_study("quality"), tmp_path / "q")
    assert len(names(q, "train")) == 10 * 2 and len(names(q, "evaluate")) == 20 and not names(q, "classify")
    argv = " ".join(next(t for t in q if t.name == "gan/sngan_proj-s1-32").argv)
    assert "steps=440" in argv and "scarce" not in argv
    # the shard stage's process pool takes the stage's CPUs, not the machine's
    assert "workers=2" in next(t for t in q if t.name == "data/shards-32").argv
    one = expand(load_study("quality", ["resources.shard.cpus=1"]), tmp_path / "q1")
    assert "workers=1" in next(t for t in one if t.name == "data/shards-32").argv
    q64 = expand(load_study("quality64"), tmp_path / "q64")   # quality.yaml at 64 px, its own step counts
    assert names(q64) == [n.replace("-32", "-64") for n in names(q)]
    assert "steps=132" in " ".join(next(t for t in q64 if t.name == "gan/sngan_proj-s1-64").argv)
    x4 = expand(load_study("quality64x4"), tmp_path / "x4")   # quality64 at 4x each model's steps
    assert names(x4) == names(q64)
    for t in (t for t in q64 if t.stage == "train"):
        steps = int(next(a for a in t.argv if a.startswith("steps="))[6:])
        steps_x4 = int(next(a for a in next(u for u in x4 if u.name == t.name).argv if a.startswith("steps="))[6:])
        assert 3.9 < steps_x4 / steps < 4.1, t.name
    sc = expand(load_study("scarcity"), tmp_path / "s")
    by = {t.name: " ".join(t.argv) for t in sc}
    cut = "scarce={monocyte:20,eosinophil:20}"
    # a GAN of seed 1 and every classifier of seed 1 use the same cut: scarce_seed=1
    assert f"{cut} scarce_seed=1" in by["gan/cgan-s1-32"]
    for regime in ("original", "original+synthetic-cellgan", "rival-original", "on_rival-original+synthetic-cgan"):
        assert f"{cut} scarce_seed=1" in by[f"cls/small_resnet-{regime}-s1-32"]
    assert "synthetic=" in by["cls/small_resnet-original+synthetic-cgan-s2-32"]
    assert "scarce" not in by["cls/small_resnet-full-original-s1-32"]
    # classify: 3 seeds x (original + 2 GANs' top-up) and the 24-recipe search; rival: rival, full, 2 x on_rival
    assert len(names(sc, "classify")) == 3 * (1 + 2) + 24 and len(names(sc, "rival")) == 3 * (1 + 1 + 2)
    with pytest.raises(SettingsError, match="data.scarce.monocyte"):
        load_study("scarcity", ["data.scarce.monocyte=0"])
    s64 = expand(load_study("scarcity64"), tmp_path / "s64")   # one seed at 64 px, the same rows
    by64 = {t.name: " ".join(t.argv) for t in s64}
    assert "size=64" in by64["data/shards-64"] and "steps=656" in by64["gan/cellgan-s0-64"]
    assert len(names(s64, "classify")) == 1 + 2 + 24 and len(names(s64, "rival")) == 1 + 1 + 2


@pytest.mark.parametrize("override, message", [
    ("gan.models=[wgan_gp_ac,nosuchgan]", "gan.models: unknown model 'nosuchgan'"),
    ("+gan.model_overrides.dcgna=['steps=3']", "gan.model_overrides: unknown model 'dcgna'"),
    ("generate.models=[dcgan]", "dcgan' is unconditional"),
    ("generate.models=[]", "use synthetic data but generate.models is empty"),
    ("gan.sizes=[48]", "gan.sizes=48"),
    ("gan.seeds=[0,0]", "repeats a value"),
    ("resources.trian.cpus=2", "resources='trian'"),
    ("gan.stepz=3", "gan.stepz: unknown setting"),
    ("evaluate.metrics=[fid,nosuch]", "evaluate.metrics: unknown metrics"),
    ("gan.steps=abc", "gan.steps"),
    ("classify.regimes=[originl]", "classify.regimes: regime='originl'"),
    ("classify.archs=[resnet51]", "classify.archs: arch='resnet51'"),
])
def test_bad_study_settings_fail_with_one_line_naming_the_key(override, message):
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        load_study("tiny", [override])
    assert "\n" not in str(e.value)


def test_more_real_runs_the_rival_on_the_same_seeds_cut_with_more_cells_of_each_cut_class(tmp_path):
    """classify.more_real=[40]: per seed, the search's winner with each cut class at 40 real cells, cut with the
    seed's scarce_seed (the cut is nested: the 20 and 20 more), tagged real40; refused without a cut, at or under
    a cut class's count, and without the rival search."""
    sc = expand(load_study("scarcity", ["data.scarce={monocyte: 20, eosinophil: 10}", "classify.more_real=[40]"]),
                tmp_path)
    by = {t.name: t for t in sc}
    for seed in (0, 1, 2):
        t = by[f"cls/small_resnet-real40-original-s{seed}-32"]
        argv = " ".join(t.argv)
        assert t.stage == "rival" and "tag=real40" in argv and "regime=original" in argv
        assert f"scarce={{monocyte:40,eosinophil:40}} scarce_seed={seed}" in argv
        assert "recipe_from=" in argv and "synthetic=" not in argv
        assert set(t.deps) >= {d for d in by[f"cls/small_resnet-rival-original-s{seed}-32"].deps}
    assert len(names(sc, "rival")) == 3 * (1 + 1 + 2 + 1)
    for override, message in (("~data.scarce", "the study cuts no class"),
                              ("classify.more_real=[20]", "20 is not above the cut of ['monocyte', 'eosinophil']"),
                              ("classify.more_real=[40,40]", "repeats a value"),
                              ("classify.rival_search=null", "take the rival search's winner")):
        extra = ["classify.full=false", "classify.on_rival=[]"] if "rival_search" in override else []
        with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
            load_study("scarcity", ["classify.more_real=[40]", *extra, override])
    summary = study_summary(dataclasses.asdict(load_study("scarcity", ["classify.more_real=[40]"])))
    assert "with more real cells [40]" in summary


def test_a_command_line_cut_replaces_the_studys_and_tilde_removes_it():
    """Issue 18: data.scarce={basophil: 30} also cut the study's monocyte and eosinophil (merged)."""
    assert load_study("scarcity").data.scarce == {"monocyte": 20, "eosinophil": 20}
    assert load_study("scarcity", ["data.scarce={basophil: 30}"]).data.scarce == {"basophil": 30}
    assert load_study("scarcity", ["~data.scarce"]).data.scarce is None
    assert load_study("scarcity", ["data.sources={pbc: /x}"]).data.sources == {"pbc": "/x"}
    # the last one given wins, in order; other mappings keep merging
    s = load_study("scarcity", ["~data.scarce", "data.scarce={basophil: 5}", "resources.train.cpus=3"])
    assert s.data.scarce == {"basophil": 5}
    assert s.resources["train"].cpus == 3 and s.resources["train"].time_min == load_study("scarcity").resources["train"].time_min
    with pytest.raises(SettingsError, match="no key data.scrace"):
        load_study("scarcity", ["~data.scrace"])
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        from sweep import split_args   # tools/sweep.py: ~KEY is an override, not a bad argument
    finally:
        sys.path.pop(0)
    assert split_args(["study=scarcity", "out=x", "~data.scarce"])[2] == ["~data.scarce"]


def argv_has(argv: list[str], *wanted: str) -> bool:
    return all(w in argv for w in wanted)


def test_the_lever_study_trains_variants_of_one_model_and_names_their_sets(tmp_path):
    """Issue 20: a lever is a GAN variant (the model's overrides, then its own) or a set variant (another set
    of a GAN above); classifiers and evaluations name them, so the report keeps them apart."""
    s = load_study("levers")
    tasks = {t.name: t for t in expand(s, tmp_path)}
    argv = tasks["gan/cellgan-long-s0-32"].argv
    assert "model=cellgan" in argv and argv[-3:] == ["steps=1900", "steps=1000000", "time_budget_s=600"]
    assert "balance_classes=false" == tasks["gan/cellgan-nobal-s0-32"].argv[-1]          # after the study's true
    cur = tasks["synthetic/cellgan-long-curated-s0-32"]
    assert cur.deps[0] == "gan/cellgan-long-s0-32" and f"run={tmp_path.resolve()}/gan/cellgan-long-s0-32" in cur.argv
    assert "per_class=300" in cur.argv and "curate=true" in cur.argv and not any("balance=" in a for a in cur.argv)
    assert "tag=cellgan-gsr" in tasks["eval/cellgan-gsr-s0-32"].argv
    assert not any(a.startswith("tag=") for a in tasks["eval/cellgan-s0-32"].argv)    # a model keeps its name
    on = {t.grid["synthetic_from"]: t for t in tasks.values()
          if t.grid.get("tag") == "on_rival" and t.grid["regime"] == "original+synthetic"}
    assert set(on) == set(s.generate.models)
    assert "synthetic_name=cellgan-curated" in on["cellgan-curated"].argv
    assert not any(a.startswith("synthetic_name=") for a in on["cellgan"].argv)
    assert "synthetic/cellgan-curated-s0-32" in on["cellgan-curated"].deps
    assert tasks["gan/cellgan-utlo-full-s0-32"].argv[-2:] == ["model.class_from=16", "model.utlo_alpha=1.0"]
    views = tasks["synthetic/cellgan-bagan-views-s0-32"]
    assert views.deps[0] == "gan/cellgan-bagan-s0-32" and argv_has(views.argv, "views=true", "view_classes=scarce")
    assert tasks["gan/cellgan-bagan-long-s0-32"].argv[-4:] == ["steps=1900", "model.ae_init=2000", "steps=1000000",
                                                                "time_budget_s=600"]
    assert len([t for t in tasks.values() if t.stage == "rival"]) == 2 + 14 * 3         # rival, full; 14 sets x 3


@pytest.mark.parametrize("overrides, message", [
    (["+gan.variants.cgan={model: cellgan}"], "gan.variants.cgan: a variant needs a name of its own"),
    (["+gan.variants.x={model: nosuch}"], "gan.variants.x.model: unknown model 'nosuch'"),
    (["+generate.variants.y={gan: cgan}", "generate.models=[cellgan,y]"], "generate.variants.y.gan: 'cgan' is not"),
    (["+generate.variants.cellgan={gan: cellgan}"], "generate.variants.cellgan: a variant needs a name of its own"),
    (["generate.models=[cellgan,zz]"], "generate.models: 'zz' is not trained in this study"),
    (["classify.on_rival=['original+synthetic synthetic_count=400']"], "may take more than the generate.per_class=300"),
    (["classify.on_rival=['original+synthetic synthetic_count=3x']"], "may take more than the generate.per_class=300"),
    (["generate.per_class=0"], "generate.per_class"),
    (["generate.balance=500"], "generate.balance=500 and generate.per_class=300 both say"),
    (["+gan.variants.x={model: cellgan, overrides: ['seed=3']}"], "gan.variants.x.overrides: 'seed=3' sets seed"),
    (["gan.model_overrides.cellgan=['model=cgan']"], "gan.model_overrides.cellgan: 'model=cgan' sets model"),
    (["gan.overrides=['scarce={}']"], "gan.overrides: 'scarce={}' sets scarce.*data.scarce"),
    (["generate.overrides=['count=5']"], "generate.overrides: 'count=5' sets count"),
    (["generate.overrides=['per_class=5']"], "generate.overrides: 'per_class=5' sets per_class"),
    (["+generate.variants.z={gan: cellgan, overrides: ['out=/tmp/x']}"], "generate.variants.z.overrides: 'out=/tmp/x'"),
    (["classify.overrides=['seed=4']"], "classify.overrides: 'seed=4' sets seed.*classify.seeds"),
    (["classify.overrides=['regime=original']"], "classify.overrides: 'regime=original' sets regime"),
    (["evaluate.overrides=['metrics=[fid]']"], "evaluate.overrides: 'metrics=[fid]' sets metrics.*evaluate.metrics"),
    (["classify.overrides=['synthetic_count=20']"], "sets synthetic_count.*original\\+synthetic synthetic_count=N"),
    (["evaluate.overrides=['out=/tmp/e']"], "evaluate.overrides: 'out=/tmp/e' sets out"),
    (["data.scarce={Monocyte: 20}"], "data.scarce: unknown classes ['Monocyte'] .did you mean 'monocyte'"),
    (["data.scarce={ig: 20}"], "unknown classes ['ig'].*'immature granulocyte'.*immature\\\\ granulocyte"),
])
def test_bad_lever_settings_fail_naming_the_key(overrides, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_study("levers", overrides)


def test_the_lever_study_draws_class_swapped_sets_from_the_long_bagan(tmp_path):
    """The class-swapped sets (view_from=others; docs/studies.md) are named, not run by default."""
    s = load_study("levers", ["gan.models=[cellgan-bagan-long]",
                              "generate.models=[cellgan-bagan-long-swap,cellgan-bagan-long-swap-curated]"])
    tasks = {t.name: t for t in expand(s, tmp_path)}
    for name, curated in (("cellgan-bagan-long-swap", False), ("cellgan-bagan-long-swap-curated", True)):
        task = tasks[f"synthetic/{name}-s0-32"]
        assert task.deps[0] == "gan/cellgan-bagan-long-s0-32"
        assert argv_has(task.argv, "views=true", "view_classes=scarce", "view_from=others", "view_anchors=20")
        assert ("curate=true" in task.argv) == curated
    assert not any("swap" in m for m in load_study("levers").generate.models)


def test_the_lever_study_narrows_to_some_levers_from_the_command_line(tmp_path):
    """The set variants it no longer lists stay unused (a curated set of a GAN left out is not an error)."""
    s = load_study("levers", ["gan.models=[cellgan,cellgan-gsr]", "generate.models=[cellgan,cellgan-gsr]"])
    tasks = expand(s, tmp_path)
    assert names(tasks, "train") == ["gan/cellgan-s0-32", "gan/cellgan-gsr-s0-32"]
    assert names(tasks, "generate") == ["synthetic/cellgan-s0-32", "synthetic/cellgan-gsr-s0-32"]


def test_a_study_grid_takes_composed_regimes(tmp_path):
    """Issue 19: a grid entry is a preset with axes; its classifier gets them, its run name says them."""
    s = load_study("tiny", ["classify.regimes=[original,'balanced augment=aug2','original+synthetic sampling=balanced']"])
    cls = {t.grid["regime"]: t for t in expand(s, tmp_path) if t.stage == "classify"}
    assert set(cls) == {"original", "balanced augment=aug2", "original+synthetic sampling=balanced"}
    assert "regime='balanced augment=aug2'" in cls["balanced augment=aug2"].argv
    assert cls["original+synthetic sampling=balanced"].deps[-1].startswith("synthetic/")   # reads a synthetic set
    assert "balanced_augment_aug2" in cls["balanced augment=aug2"].name
    with pytest.raises(SettingsError, match="sampling='often'"):
        load_study("tiny", ["classify.regimes=['balanced sampling=often']"])


def test_status_says_what_the_study_resolved_to(tmp_path):
    from hpcgan.sweep import status_report
    _tiny_study_dir(tmp_path)
    text, _ = status_report(tmp_path)
    assert "cut (data.scarce): none" in text and "models ['wgan_gp_ac', 'dcgan'], seeds [0]" in text, text
    assert "the embedded simulator" in text and "regimes ['original', 'original+synthetic']" in text, text


def test_cluster_file_documents_the_dataclass_defaults():
    documented = yaml.safe_load((CONFIG_DIR / "cluster" / "default.yaml").read_text())
    assert documented == OmegaConf.to_container(OmegaConf.structured(ClusterSettings))
    assert {f.name for f in dataclasses.fields(ClusterSettings)} == set(documented)


def test_stage_resources_fall_back_to_the_cluster_file():
    s = load_study("tiny", ["resources.train.gpus=2", "cluster.resources.partition=gpu", "+resources.train.sbatch.exclusive=true"])
    r = s.stage_resources("train")
    assert (r["gpus"], r["ranks"], r["cpus"], r["partition"], r["nodes"], r["sbatch"]) == (2, 2, 1, "gpu", 1, {"exclusive": True})
    assert s.stage_resources("generate")["gpus"] == 0 and s.stage_resources("generate")["ranks"] == 1


def test_hydra_values_and_torchrun_commands():
    assert hydra_value("/a/b+c-d_e.f") == "/a/b+c-d_e.f"
    assert hydra_value("/a b/c") == "'/a b/c'" and hydra_value("x,y:z") == "'x,y:z'"
    assert hydra_value(["fid", "smudge cell"]) == "[fid,'smudge cell']" and hydra_value(False) == "false"
    task = {"argv": ["-m", "hpcgan.train", "steps=3"], "resources": {"ranks": 1, "nodes": 1}}
    assert command(task, "py") == ["py", "-m", "hpcgan.train", "steps=3"]
    task["resources"]["ranks"] = 4
    cmd = command(task, "py")
    assert cmd[:4] == ["py", "-m", "torch.distributed.run", "--nproc_per_node=4"] and "--standalone" in cmd
    assert cmd[-3:] == ["-m", "hpcgan.train", "steps=3"]


def test_a_cut_of_classes_with_spaces_reaches_the_commands_as_hydra_reads_it(tmp_path):
    """Hydra has no quoted dict keys: a cut class with a space (or : , brackets) is written escaped, and the
    override the GAN and classifier commands get parses back to the study's cut."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parse = OverridesParser.create().parse_override
    cut = {"immature granulocyte": 20, "a:b,c(d)": 3, "basophil": 1}
    assert hydra_value(cut) == r"{immature\ granulocyte:20,a\:b\,c\(d\):3,basophil:1}"
    assert parse("scarce=" + hydra_value(cut)).value() == cut
    for bad in ("it's", "10", "true", "null", "1e3", ""):   # unwritable, or read back as a number, bool or None
        with pytest.raises(ValueError, match="rename it"):
            hydra_value({bad: 1})
    assert hydra_value({32: "/s"}) == "{32:/s}"                  # a non-string key that reads back as itself
    s = load_study("scarcity", ["data.scarce={immature granulocyte: 20, smudge cell: 10}"])
    tasks = expand(s, tmp_path)
    for stage in ("train", "classify"):
        argv = next(t.argv for t in tasks if t.stage == stage)
        scarce = next(a for a in argv if a.startswith("scarce="))
        assert parse(scarce).value() == {"immature granulocyte": 20, "smudge cell": 10}


def test_dependencies_wait_on_exactly_the_upstream_tasks():
    def t(name, *deps):
        return {"name": name, "deps": list(deps)}
    arrays = {"10": ("train", ["gan/a", "gan/b", "gan/c"])}
    job_of = {"gan/a": "10_0", "gan/b": "10_1", "gan/c": "10_2", "data/cell": "9"}
    # evaluations line up one to one with the training array (whatever their order): aftercorr, so one failed
    # GAN cancels only its own evaluation; plus afterok on the shared extractor task
    plans = plan_arrays([t("eval/c", "gan/c", "data/cell"), t("eval/a", "gan/a", "data/cell"),
                         t("eval/b", "gan/b", "data/cell")], job_of, arrays)
    assert [([x["name"] for x in ts], dep) for ts, dep in plans] == [
        (["eval/a", "eval/b", "eval/c"], "aftercorr:10,afterok:9")]
    # a subset: afterok on those array tasks; every task of the array: the array id; nothing queued: no wait
    plans = plan_arrays([t("syn/a", "gan/a"), t("syn/c", "gan/c"), t("cls/real", "data/done")], job_of, arrays)
    assert [([x["name"] for x in ts], dep) for ts, dep in plans] == [
        (["cls/real"], None), (["syn/a", "syn/c"], "afterok:10_0:10_2")]
    plans = plan_arrays([t("x", "gan/a", "gan/b", "gan/c")], job_of, arrays)
    assert plans[0][1] == "afterok:10"


# ---------------------------------------------------------------- the lock (real processes)

def _tiny_study_dir(out: Path) -> dict:
    """A study directory holding the tiny study's tasks (nothing run)."""
    from hpcgan.sweep import write_study
    s = load_study("tiny")
    return write_study(out, s, expand(s, out), "tiny", [], "local")


def test_a_busy_run_directory_is_not_run_twice_and_a_dead_holder_is_taken_over(tmp_path):
    import socket
    doc = _tiny_study_dir(tmp_path)
    files = TaskFiles(tmp_path, "data/sim")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        files.dir.mkdir(parents=True)
        files.lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "job": None}))
        with pytest.raises(TaskError, match=f"already running.*pid {sleeper.pid}"):
            with files.locked({"host": socket.gethostname(), "pid": os.getpid(), "token": "me"}):
                pass
        files.update(state="running", attempt=1)
        status = {st.name: st for st in collect_status(tmp_path, doc)}["data/sim"]
        assert status.state == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    # its holder is gone: the task shows as failed, and the next runner takes the lock over
    status = {st.name: st for st in collect_status(tmp_path, doc)}["data/sim"]
    assert status.state == "failed" and "stopped without finishing" in status.note
    with files.locked({"host": socket.gethostname(), "pid": os.getpid(), "token": "me"}):
        assert files.holder()["token"] == "me"
    assert not files.lock_path.exists()
    assert {st.name: st.state for st in collect_status(tmp_path, doc)}["gan/dcgan-s0-32"] == "missing"


# ---------------------------------------------------------------- end to end

def sweep_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*SWEEP, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          env={**(env or os.environ), "OMP_NUM_THREADS": "1"})


def classify_args() -> list[str]:
    return [] if HAVE_CLASSIFY else ["classify.enabled=false"]


def mtimes(out: Path, doc: dict) -> dict[str, float]:
    """The newest modification time of every finished task's outputs."""
    result = {}
    for t in doc["tasks"]:
        if finished(t):
            target = Path(t["out"])
            files = [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else [target]
            result[t["name"]] = max(p.stat().st_mtime_ns for p in files)
    return result


def check_results(out: Path, models: set[str]) -> None:
    """Every evaluation (one per GAN in `models`) wrote finite FIDs in results rows the report reads."""
    from hpcgan.results import read_rows
    rows = [r for p in sorted((out / "gan").glob("*/eval/results.jsonl")) for r in read_rows(p)]
    fids = {r["model"]: r["value"] for r in rows if r["metric"] == "fid" and r["class"] is None}
    assert set(fids) == models and all(math.isfinite(v) for v in fids.values()), fids
    syn = json.loads((out / "synthetic" / "wgan_gp_ac-s0-32" / "manifest.json").read_text())
    assert syn["synthetic"] is True and sum(syn["counts"]["train"].values()) > 0


def check_strict_json(out: Path) -> None:
    """Every JSON and JSON-lines file the study wrote parses without NaN / Infinity (issue 18)."""
    from hpcgan.jsonfile import loads_strict
    files = [p for p in out.rglob("*.json*") if p.suffix in (".json", ".jsonl")]
    assert len(files) > 20, files
    for p in files:
        text = p.read_text()
        for doc in (text.splitlines() if p.suffix == ".jsonl" else [text]):
            if doc.strip():
                loads_strict(doc)


def check_report(out: Path) -> None:
    """The report reads the study: Table 3 has both GANs (and Table 5 each regime, the synthetic one once per
    GAN), numbers finite, and it draws every figure."""
    import pandas as pd
    r = subprocess.run([sys.executable, "tools/report.py", str(out)], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "not drawn" not in r.stderr, r.stdout + r.stderr
    written = json.loads((out / "report" / "index.json").read_text())
    table3 = pd.read_csv(written["table3_cell_32px"])
    assert sorted(table3["model"]) == ["cgan", "wgan_gp_ac"] and table3["fid_mean"].map(math.isfinite).all()
    assert {"fig_samples", "fig_ac_accuracy"} <= set(written), written
    if HAVE_CLASSIFY:
        table5 = pd.read_csv(written["table5_32px"])
        assert sorted(zip(table5["regime"], table5["synthetic_from"].fillna("–"))) == [
            ("original", "–"), ("original+synthetic", "cgan"), ("original+synthetic", "wgan_gp_ac")]
        assert table5["accuracy_mean"].between(0, 1).all()
        assert "fig_per_class_32px" in written, written


TWO_GANS = ("gan.models=[wgan_gp_ac,cgan]", "generate.models=[wgan_gp_ac,cgan]")  # two synthetic sets: issue 18


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tiny_study_runs_here_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "study"
    r = sweep_cli("study=tiny", f"out={out}", "executor=local", *TWO_GANS, *classify_args())
    assert r.returncode == 0, r.stdout + r.stderr
    said = r.stdout.index("  gan       models ['wgan_gp_ac', 'cgan']")   # what it resolved to, said first
    assert said < r.stdout.index("data/sim") and "cut (data.scarce): none" in r.stdout, r.stdout
    doc = read_study(out)
    statuses = collect_status(out, doc)
    assert {st.state for st in statuses} == {"finished"}, [(st.name, st.state, st.note) for st in statuses]
    assert len(statuses) == (12 if HAVE_CLASSIFY else 9)
    check_results(out, {"wgan_gp_ac", "cgan"})
    check_report(out)
    check_strict_json(out)
    before = mtimes(out, doc)
    again = sweep_cli(f"out={out}", "executor=local")   # same study (study.json), nothing left to do
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    assert mtimes(out, doc) == before
    shown = sweep_cli("status", f"out={out}")
    assert shown.returncode == 0 and f"{len(statuses)}/{len(statuses)} tasks finished" in shown.stdout, shown.stdout


# ---------------------------------------------------------------- on the real local Slurm

@pytest.fixture(scope="module")
def sim_shards(simulated_shards) -> Path:
    return simulated_shards(0.3)


def wait_settled(out: Path, timeout: float = 300) -> list:
    """Poll until no task is pending, running or requeued."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        statuses = collect_status(out)
        if not any(st.state in ("pending", "running", "requeued") for st in statuses):
            return statuses
        time.sleep(2)
    raise AssertionError(f"study still running after {timeout:.0f} s: {[(st.name, st.state) for st in statuses]}")


def submitted_tasks(out: Path) -> list[list[str]]:
    path = out / "submissions.jsonl"
    return [json.loads(line)["tasks"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_request_the_partition_cannot_meet_fails_at_submission(slurm_cluster, sim_shards, tmp_path):
    out = tmp_path / "study"
    r = sweep_cli("study=tiny", f"out={out}", "executor=slurm", f"data.shards={sim_shards}",
                  "resources.train.cpus=10000", env=slurm_cluster.env)
    assert r.returncode == 2 and "stage train: Slurm refuses its request" in r.stderr, r.stdout + r.stderr
    assert "cpus_per_task=10000" in r.stderr and "nothing was submitted" in r.stderr
    assert submitted_tasks(out) == []


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_tiny_study_on_slurm_survives_scancel_and_relaunch(slurm_cluster, sim_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf or os.environ.get("SLURM_CONF", ""))
    if not slurm_cluster.conf:
        monkeypatch.delenv("SLURM_CONF")
    out = tmp_path / "study"
    # the DCGAN trains for 20 s of training time, however many steps that is: the cancel, sent once it has
    # logged a step, lands while it runs however loaded the machine is, and the relaunch ends it by the budget
    args = ["study=tiny", f"out={out}", "executor=slurm", f"data.shards={sim_shards}", "gan.steps=30",
            "+gan.model_overrides.dcgan=['steps=1000000','time_budget_s=20']", *classify_args()]
    first = sweep_cli(*args, env=slurm_cluster.env)
    assert first.returncode == 0 and "train: 2 task(s) -> job" in first.stdout, first.stdout + first.stderr
    n_submitted = len(submitted_tasks(out))
    # a second launch while the first is under way submits nothing
    second = sweep_cli(*args, env=slurm_cluster.env)
    assert second.returncode == 0 and "nothing to do" in second.stdout, second.stdout + second.stderr
    assert len(submitted_tasks(out)) == n_submitted

    # cancel the DCGAN while it trains
    files = TaskFiles(out, "gan/dcgan-s0-32")
    dcgan_status = out / "gan" / "dcgan-s0-32" / "status.json"
    deadline = time.monotonic() + 180
    while not (dcgan_status.is_file() and json.loads(dcgan_status.read_text()).get("step", 0)):
        assert time.monotonic() < deadline, "the DCGAN task never logged a step"
        time.sleep(0.2)
    slurm_cluster.run("scancel", files.state()["job"])
    statuses = {st.name: st for st in wait_settled(out)}
    assert statuses["gan/dcgan-s0-32"].state == "failed"
    assert statuses["eval/dcgan-s0-32"].state == "failed"        # its evaluation can never run ...
    assert statuses["eval/wgan_gp_ac-s0-32"].state == "finished"  # ... the other GAN's does (aftercorr)
    assert statuses["synthetic/wgan_gp_ac-s0-32"].state == "finished"
    shown = sweep_cli("status", f"out={out}", env=slurm_cluster.env)
    assert shown.returncode == 1 and "gan/dcgan-s0-32" in shown.stdout
    assert any(line.startswith("gan/dcgan-s0-32") and " failed " in line for line in shown.stdout.splitlines()), shown.stdout

    # the relaunch submits only what did not finish, and finishes it without touching the rest
    doc = read_study(out)
    before = mtimes(out, doc)
    relaunch = sweep_cli(f"out={out}", env=slurm_cluster.env)
    assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
    assert sorted(sum(submitted_tasks(out)[n_submitted:], [])) == ["eval/dcgan-s0-32", "gan/dcgan-s0-32"]
    statuses = wait_settled(out)
    assert {st.state for st in statuses} == {"finished"}, [(st.name, st.state, st.note) for st in statuses]
    assert {k: v for k, v in mtimes(out, doc).items() if k in before} == before
    check_results(out, {"wgan_gp_ac", "dcgan"})
    dcgan = json.loads(dcgan_status.read_text())
    assert dcgan["state"] == "finished" and 0 < dcgan["step"] < 1000000, dcgan
    assert dcgan["time_budget"]["step_reached"] == dcgan["step"], dcgan   # ended by its budget, across the resume


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, sim_shards, tmp_path, monkeypatch):
    """USR2 to the job (what Slurm sends cluster.signal_delay_s before the time limit): the training saves a
    checkpoint, the task requeues itself (submitit Checkpointable) and the same job resumes and finishes."""
    if slurm_cluster.conf:
        monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    out = tmp_path / "study"
    r = sweep_cli("study=tiny", f"out={out}", "executor=slurm", f"data.shards={sim_shards}", "gan.models=[dcgan]",
                  "generate.models=[]", "evaluate.enabled=false", "classify.enabled=false", "gan.steps=150",
                  "gan.model_overrides.dcgan=['ckpt_every=50']", env=slurm_cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr
    run = out / "gan" / "dcgan-s0-32"
    deadline = time.monotonic() + 180
    while not (json.loads((run / "status.json").read_text()).get("step", 0) if (run / "status.json").is_file() else 0):
        assert time.monotonic() < deadline, "the training never logged a step"
        time.sleep(0.2)
    job = TaskFiles(out, "gan/dcgan-s0-32").state()["job"]
    slurm_cluster.run("scancel", "--signal=USR2", job)
    statuses = wait_settled(out, 240)
    assert [st.state for st in statuses] == ["finished"], [(st.name, st.state, st.note) for st in statuses]
    state = TaskFiles(out, "gan/dcgan-s0-32").state()
    log = (out / "tasks" / "gan" / "dcgan-s0-32" / "output.log").read_text()
    assert state["attempt"] == 2 and state["job"] == job, state
    assert "stopped by SIGUSR2" in log and "resuming from" in log, log[-3000:]
    assert json.loads((run / "status.json").read_text())["step"] == 150
    assert "Restarts=1" in slurm_cluster.run("scontrol", "show", "job", job).stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_hydra_multirun_of_training_is_one_slurm_array(slurm_cluster, sim_shards, tmp_path):
    """`python -m hpcgan.train -m model=a,b seed=0,1 hydra/launcher=submitit_slurm`: 4 trainings, one array."""
    r = subprocess.run([sys.executable, "-m", "hpcgan.train", "-m", f"shards={sim_shards}",
                        f"run_dir={tmp_path}/runs/${{model.name}}-s${{seed}}", "model=dcgan,cgan", "seed=0,1",
                        "steps=2", "model.width=8", "batch_size=8", "sample_every=0", "progress=false",
                        "tensorboard=false", "precision=fp32", "hydra/launcher=submitit_slurm",
                        f"hydra.sweep.dir={tmp_path}/multirun", "hydra.launcher.cpus_per_task=1",
                        "hydra.launcher.timeout_min=10"],
                       env={**slurm_cluster.env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True,
                       text=True, timeout=560)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("dcgan-s0", "dcgan-s1", "cgan-s0", "cgan-s1"):
        status = json.loads((tmp_path / "runs" / name / "status.json").read_text())
        assert (status["state"], status["step"], status["model"]) == ("finished", 2, name.split("-")[0])
    jobs = [p.name for p in (tmp_path / "multirun" / ".submitit").iterdir() if p.is_dir() and "_" in p.name]
    assert len(jobs) == 4 and len({j.split("_")[0] for j in jobs}) == 1, jobs   # ARRAYID_0..3


def test_bench_sweep_runs_no_op_tasks_and_reads_their_status(tmp_path):
    """tools/bench_sweep.py: a study of no-op processes on the local executor, its status and a relaunch."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_sweep", REPO_ROOT / "tools" / "bench_sweep.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    result = tool.main(["--tasks", "12", "--grid-seeds", "4", "--out", str(tmp_path / "b.json"),
                        "--work", str(tmp_path)])
    assert json.loads((tmp_path / "b.json").read_text()) == result
    assert result["expand"]["tasks"] > 142            # the paper grid (142 tasks at 3 seeds), widened
    assert result["run"] == {**result["run"], "tasks": 12, "failed": 0}
    assert result["status"]["finished"] == 12 and result["relaunch"]["todo"] == 0
    assert result["files"]["per_task"] >= 2           # each task's state.json and output.log at least


def test_a_top_up_larger_than_the_sets_is_refused_before_any_gan(tmp_path):
    """levers' sets hold generate.per_class=300 of every class: on shards whose largest train class has 1,000
    images the top-up of a class cut to 20 needs 980, refused when the study is read, not after the GANs."""
    import json
    classes = ["basophil", "eosinophil", "monocyte", "neutrophil"]
    for name, largest in (("big", 1000), ("small", 280)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(
            {"classes": classes, "counts": {"train": {"basophil": 50, "eosinophil": 280, "monocyte": 280,
                                                      "neutrophil": largest}}}))
    with pytest.raises(SettingsError, match="up to 980 synthetic images.*per_class=980 or more"):
        load_study("levers", [f"data.shards={tmp_path / 'big'}"])
    assert load_study("levers", [f"data.shards={tmp_path / 'small'}"]).generate.per_class == 300
    # without a top-up regime the per_class sets are enough (the synthetic-only regime tops nothing up)
    load_study("levers", [f"data.shards={tmp_path / 'big'}", "classify.on_rival=['original+synthetic synthetic_count=20']"])
    load_study("levers", [f"data.shards={tmp_path / 'big'}", "classify.on_rival=[synthetic]"])


def test_the_cut_classes_are_checked_against_the_shards_own_classes(tmp_path):
    """A shard set of other classes (its manifest, also as {size: dir}) is what a cut names; the taxonomy's
    classes are then not enough."""
    import json
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(
        {"classes": ["blast", "other"], "counts": {"train": {"blast": 40, "other": 40}}}))
    for shards in (str(tmp_path / "s"), "{32: " + str(tmp_path / "s") + "}"):
        assert load_study("levers", [f"data.shards={shards}", "data.scarce={blast: 20}"]).data.scarce == {"blast": 20}
        with pytest.raises(SettingsError, match=r"unknown classes \['monocyte'\]"):
            load_study("levers", [f"data.shards={shards}", "data.scarce={monocyte: 20}"])
        with pytest.raises(SettingsError, match=r"more images than .*\{'blast': '41 > 40'\}"):
            load_study("levers", [f"data.shards={shards}", "data.scarce={blast: 41}"])
        load_study("levers", [f"data.shards={shards}", "data.scarce={blast: 20}", "classify.more_real=[30,40]"])
        with pytest.raises(SettingsError, match=r"more_real asks more images .*\{'blast': '41 > 40'\}"):
            load_study("levers", [f"data.shards={shards}", "data.scarce={blast: 20}", "classify.more_real=[30,41]"])
