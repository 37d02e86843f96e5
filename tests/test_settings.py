"""hpcgan.settings: typed settings with one-line errors."""
from dataclasses import dataclass, field

import pytest

from hpcgan.settings import SettingsError, check_choice, check_range, parse


@dataclass
class Example:
    out: str = "???"
    size: int = 128
    rate: float = 1.0
    names: list[str] = field(default_factory=list)
    note: str | None = None

    def __post_init__(self):
        check_choice("size", self.size, (32, 64, 128))
        check_range("rate", self.rate, 0, 1)


def test_values_are_converted_and_defaults_filled():
    s = parse(Example, {"out": "x", "size": "64", "names": ["a", "b"]})
    assert s == Example(out="x", size=64, rate=1.0, names=["a", "b"], note=None)


@pytest.mark.parametrize("cfg, words", [
    ({"out": "x", "size": "abc"}, ["size", "abc"]),
    ({"size": 64}, ["out", "required"]),
    ({"out": "x", "sise": 64}, ["sise", "known: out, size"]),
    ({"out": "x", "size": 100}, ["size=100", "32, 64, 128"]),
    ({"out": "x", "rate": 2.0}, ["rate=2.0", "[0, 1]"]),
])
def test_bad_value_is_one_line_naming_the_key(cfg, words):
    with pytest.raises(SettingsError) as e:
        parse(Example, cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg
