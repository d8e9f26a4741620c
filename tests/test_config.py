"""Config loading: strict keys, --set overrides, one-line errors."""

from pathlib import Path

import pytest

from dreamshard.config import GenerateConfig, apply_overrides, load_config, parse_overrides, read_yaml
from dreamshard.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_valid_config_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "run:\n  seed: 7\nsampling:\n  width: 64\n"), GenerateConfig)
    assert cfg.run.seed == 7
    assert cfg.sampling.width == 64
    assert cfg.sampling.height == GenerateConfig().sampling.height


def test_misspelled_key_names_the_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "run:\n  sede: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, GenerateConfig)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "run.sede" in message
    assert "seed" in message  # lists what is allowed


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'modle'.*model"):
        load_config(write(tmp_path, "modle:\n  path: x\n"), GenerateConfig)


def test_wrong_type_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "run:\n  seed: not-a-number\n"), GenerateConfig)
    assert "run.seed" in str(err.value) and "\n" not in str(err.value)


def test_overrides_parse_yaml_values_and_nest():
    data = apply_overrides({"run": {"seed": 1}}, ["run.seed=5", "prompts.classes=[car, bus]", "output.path=runs/x"])
    assert data == {"run": {"seed": 5}, "prompts": {"classes": ["car", "bus"]}, "output": {"path": "runs/x"}}


def test_override_applies_and_is_validated(tmp_path):
    path = write(tmp_path, "run:\n  seed: 1\n")
    assert load_config(path, GenerateConfig, ["run.seed=9"]).run.seed == 9
    with pytest.raises(ConfigError, match="run.workerz"):
        load_config(path, GenerateConfig, ["run.workerz=3"])


@pytest.mark.parametrize("bad", ["noequals", "=5", "a..b=1", "run.seed=[unclosed"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError):
        parse_overrides([bad])


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"run": 3}, ["run.seed=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", GenerateConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run: [unclosed\n"), GenerateConfig)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), GenerateConfig)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def schema_of(data: dict):
    from dreamshard.config import PersonalizeConfig, StudyConfig, TrainConfig

    if "method" in data:
        return TrainConfig
    if "sizes" in data:
        return StudyConfig
    if "instance" in data or "prior" in data:
        return PersonalizeConfig
    return GenerateConfig


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import yaml

    data = yaml.safe_load(path.read_text())
    load_config(path, schema_of(data))


def test_a_key_written_twice_is_an_error_not_a_silent_replacement(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  num_samples: 10\nprompts:\n  token: x\nrun:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"key 'run' appears twice in one section \(lines 1 and 5\)"):
        load_config(path, GenerateConfig)
    path.write_text("base: &base {seed: 1}\nrun:\n  <<: *base\n  num_samples: 10\n")  # merge keys and aliases still work
    assert read_yaml(path)["run"] == {"seed": 1, "num_samples": 10}


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    levels = ["a: &a [" + ", ".join(["lol"] * 9) + "]"]
    for name, previous in zip("bcdefghij", "abcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")  # 9^10 values when expanded
    path.write_text("\n".join(levels) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="an alias bomb"):
        load_config(path, GenerateConfig)
    assert time.monotonic() - started < 5
    path.write_text("run: &r {seed: 1}\n" + "\n".join(f"k{i}: *r" for i in range(120)) + "\n")
    with pytest.raises(ConfigError, match="more than 100 aliases"):
        read_yaml(path)


def test_a_byte_order_mark_is_read_past(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("\ufeffrun:\n  seed: 4\n".encode())
    assert load_config(path, GenerateConfig).run.seed == 4
