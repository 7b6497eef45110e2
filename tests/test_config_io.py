"""The shared YAML -> dataclass loader: the errors every config (model, training, server) reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from emo_stream.config_io import build_dataclass, check_keys, read_json, read_yaml
from emo_stream.errors import ConfigError, WeightsError


@dataclass
class Inner:
    count: int = 1
    rate: float = 0.5
    names: list[str] = field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Outer:
    name: str = "x"
    path: str | None = None
    flag: bool = False
    options: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


@dataclass
class Required:
    needed: int


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model config not found: .*nope\.yaml \(use a preset"):
        read_yaml(tmp_path / "nope.yaml", "model config", hint=" (use a preset)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        read_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        read_yaml(bad)


def test_read_yaml_reads_a_mapping_and_empty_is_empty(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: y\ninner:\n  count: 3\n")
    assert read_yaml(path) == {"name": "y", "inner": {"count": 3}}
    path.write_text("")
    assert read_yaml(path) == {}


def test_read_json_is_an_object_or_one_line_naming_the_file(tmp_path):
    path = tmp_path / "case.json"
    with pytest.raises(ConfigError, match=r"case\.json: file not found"):
        read_json(path)
    with pytest.raises(WeightsError, match="^the download has it$"):   # the caller's error and where it comes from
        read_json(path, WeightsError, "the download has it")
    for content, words in [("{not json", "case.json: not valid JSON"), (b"\xff\xfe{", "not valid JSON"),
                           ("[1, 2]", "case.json: expected a JSON object, got list")]:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(WeightsError, match=words):
            read_json(path, WeightsError)
    path.write_text('{"model": "hallo", "n": [1]}')
    assert read_json(path) == {"model": "hallo", "n": [1]}


def test_build_nested_with_conversions():
    cfg = build_dataclass(Outer, {"name": 7, "inner": {"rate": "1e-5", "count": 2, "betas": [0.8, 0.9]}}, "src")
    assert cfg.name == "7" and cfg.inner.count == 2
    assert cfg.inner.rate == 1e-5 and isinstance(cfg.inner.rate, float)  # PyYAML reads 1e-5 as a string
    assert cfg.inner.betas == (0.8, 0.9)
    assert build_dataclass(Outer, {"inner": None}, "src").inner == Inner()
    assert build_dataclass(Outer, None, "src") == Outer()


@pytest.mark.parametrize("data, words", [
    ({"nmae": 1}, r"src: unknown keys \['nmae'\] \(known: flag, inner, name, options, path\)"),
    ({"inner": {"cuont": 1}}, r"src: unknown keys in 'inner': \['cuont'\] \(known: betas, count, names, rate\)"),
    ({"inner": [1, 2]}, "src: inner must be a mapping, got list"),
    ({"inner": {"count": "two"}}, "src: inner.count must be int: got 'two'"),
    ({"inner": {"count": True}}, "inner.count must be int"),
    ({"inner": {"rate": "fast"}}, "src: inner.rate is not a number: 'fast'"),
    ({"inner": {"names": "a"}}, "inner.names must be list"),
    ({"flag": "yes"}, "flag must be bool"),
    ({"name": None}, "name must not be empty"),
    ({"path": [1]}, "path must be str"),
    ({"options": 3}, "options must be dict"),
])
def test_build_errors_name_the_key(data, words):
    with pytest.raises(ConfigError, match=words):
        build_dataclass(Outer, data, "src")


def test_top_level_must_be_a_mapping_and_type_errors_become_config_errors():
    with pytest.raises(ConfigError, match="src: expected a mapping at the top level"):
        build_dataclass(Outer, [1], "src")
    with pytest.raises(ConfigError, match="src: .*needed"):
        build_dataclass(Required, {}, "src")


def test_check_keys():
    check_keys({"a": 1}, ["a", "b"], "src")
    with pytest.raises(ConfigError, match=r"src: unknown keys in 's': \['c'\] \(known: a, b\)"):
        check_keys({"c": 1}, ["a", "b"], "src", "s")


def test_each_config_uses_it(tmp_path):
    """The three loaders report the same kinds of error the same way."""
    from emo_stream.families.emo.config import load_config as load_model_config
    from emo_stream.training.config import load_train_config
    from server.config import load_config as load_server_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("x: [\n")
    for load in (load_model_config, load_train_config, load_server_config):
        with pytest.raises(ConfigError, match="not valid YAML"):
            load(bad)
        with pytest.raises(ConfigError, match="not found"):
            load(tmp_path / "missing.yaml")
    bad.write_text("bogus: 1\n")
    for load in (load_model_config, load_train_config, load_server_config):
        with pytest.raises(ConfigError, match=r"unknown keys \['bogus'\]"):
            load(bad)
