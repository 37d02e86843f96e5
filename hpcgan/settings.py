"""Typed settings: one dataclass per stage, its defaults in one place, a one-line error for a bad value.

    @dataclass
    class EvaluateSettings:
        run: str | None = None
        n_per_class: int = 500

    settings = parse(EvaluateSettings, cfg)      # cfg: a Hydra DictConfig or a plain dict

`parse` merges the config into the dataclass's OmegaConf structured schema (types are checked and
converted: `size=abc` for an int fails, `size=64` given as a string is fine) and builds the dataclass,
so its `__post_init__` can check ranges and choices. Every problem is a `SettingsError` whose message is
one line naming the key and what is wrong; `exit_on_error` turns it into `NAME: error: ...` and exit 2
for the `tools/` entry points.
"""
from __future__ import annotations

import contextlib
import re
import sys
from typing import Any, Iterator, Mapping, TypeVar

T = TypeVar("T")
MISSING = "???"   # the default of a required setting (OmegaConf's marker): `out: str = MISSING`


class SettingsError(ValueError):
    """A bad setting; the message is one line that names the key."""


def parse(cls: type[T], cfg: Mapping[str, Any] | Any, *, drop: tuple[str, ...] = ("hydra",), prefix: str = "") -> T:
    """`cfg` (DictConfig or dict) checked against dataclass `cls`; returns a `cls` instance. `prefix`
    goes before the key in error messages (e.g. "model." for a nested group parsed on its own)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = {k: v for k, v in dict(cfg).items() if k not in drop}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), cfg)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        key = prefix + (getattr(e, "full_key", None) or str(e).split(":")[-1].strip())
        raise SettingsError(f"{key} is required: pass {key}=...") from None
    except OmegaConfBaseException as e:
        raise SettingsError(_one_line(e, cls, prefix)) from None


def compose_settings(cls: type[T], config_name: str, argv: list[str] | None = None) -> T:
    """configs/<config_name>.yaml with `key=value` overrides (sys.argv[1:] by default), composed by Hydra
    without changing the working directory, parsed into `cls` (a SettingsError for a bad value): the entry
    point of a stage that runs under torchrun (`python -m hpcgan.<stage> ...`)."""
    from hydra import compose, initialize_config_dir

    from hpcgan import CONFIG_DIR
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name, overrides=list(sys.argv[1:] if argv is None else argv))
    return parse(cls, cfg)


def _one_line(e: Exception, cls: type, prefix: str = "") -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    key = getattr(e, "full_key", None)
    if type(e).__name__ == "ConfigKeyError" and "not in" in msg:
        import dataclasses
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        return f"{prefix}{key}: unknown setting (known: {known})" if key else f"{msg}: unknown setting (known: {known})"
    return f"{prefix}{key}: {msg}" if key and not msg.startswith(str(key)) else prefix + msg


def field_defaults(cls: type) -> dict[str, Any]:
    """{field: its default} of a settings dataclass (fields with a plain default): what a key a checkpoint
    predates is compared as on resume."""
    import dataclasses
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")


def check_range(name: str, value, lo=None, hi=None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise SettingsError(f"{name}={value!r}: must be {bounds}")


@contextlib.contextmanager
def exit_on_error(tool: str, *errors: type[BaseException]) -> Iterator[None]:
    """In a tools/ entry point: a SettingsError (or one of `errors`) -> 'TOOL: error: MSG' and exit 2."""
    try:
        yield
    except (SettingsError, *errors) as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        sys.exit(2)


def override_key(override: str) -> str:
    """The key a Hydra override sets: `++a.b=v`, `~a.b`, `group@pkg=v` -> `a.b`, `group`."""
    return re.split(r"[=@]", override, maxsplit=1)[0].strip().lstrip("+~")
