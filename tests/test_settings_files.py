"""Every entry point's defaults live in its settings dataclass; the YAML under configs/ documents them for
people and must say the same values (so the two cannot drift)."""
import dataclasses
import importlib.util
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from hpcgan import CONFIG_DIR, REPO_ROOT


def demo_settings():
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "tools" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.DemoSettings


def schemas():
    from hpcgan.data.build import ShardSettings
    from hpcgan.evaluate import EvaluateSettings
    from hpcgan.metrics.cell import TrainFeaturesSettings
    from hpcgan.data.simulate import SimulateSettings
    from hpcgan.generate import GenerateSettings
    from hpcgan.train import TrainSettings
    return {"shard": ShardSettings, "simulate": SimulateSettings, "generate": GenerateSettings,
            "train": TrainSettings, "demo": demo_settings(), "evaluate": EvaluateSettings,
            "train_features": TrainFeaturesSettings}


@pytest.mark.parametrize("name", ["shard", "simulate", "generate", "train", "demo", "evaluate", "train_features"])
def test_yaml_defaults_equal_the_dataclass(name):
    cls = schemas()[name]
    documented = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    documented.pop("hydra", None)
    in_defaults = [next(iter(d)) for d in documented.pop("defaults", []) if isinstance(d, dict)]
    schema = OmegaConf.to_container(OmegaConf.structured(cls))
    for group in in_defaults:   # e.g. train's `model:` comes from configs/model/<name>.yaml
        if group in schema:
            assert schema.pop(group) == "???"
    assert documented == schema
    assert {f.name for f in dataclasses.fields(cls)} - set(in_defaults) == set(documented)
