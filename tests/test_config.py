"""Configs: every shipped recipe loads; bad values fail naming the field and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from longrecipe.artifacts import stage_key
from longrecipe.config import ConfigError, PipelineConfig, RuntimeConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_the_three_recipes():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "demo.yaml", "llama3-8b-80k.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    again = PipelineConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg  # saving reloads what it wrote (nanotron's check)


def test_every_field_is_documented():
    def walk(model, seen):
        if model in seen:
            return
        seen.add(model)
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no docstring"
            for sub in getattr(f.annotation, "__args__", ()) + (f.annotation,):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub, seen)

    walk(PipelineConfig, set())
    walk(RuntimeConfig, set())


def test_unknown_key_is_rejected_with_file_field_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nbuild:\n  method: longrecipe\n  trian_len: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "build.trian_len" in msg and ":4" in msg


def test_bad_value_names_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("analyze:\n  top_fraction: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: field analyze.top_fraction"):
        load_config(p)
    p.write_text("build:\n  method: magic\n")
    with pytest.raises(ConfigError, match="build.method"):
        load_config(p)


def test_overrides_apply_and_bad_overrides_are_named(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("build:\n  train_len: 100\n")
    cfg = load_config(p, ["build.train_len=200", "evaluate.lengths=[128, 256]", "model.tiny.seed=3"])
    assert cfg.build.train_len == 200 and cfg.evaluate.lengths == [128, 256] and cfg.model.tiny.seed == 3
    with pytest.raises(ConfigError, match=r"--set build.train_len"):
        load_config(p, ["build.train_len=-1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(p, ["build.train_len"])


def test_configs_are_frozen_and_runtime_never_enters_a_key():
    cfg = PipelineConfig()
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        cfg.build.train_len = 5  # type: ignore[misc]
    # the runtime config is not part of any stage section
    assert "device" not in cfg.model_dump()["build"]
    k1 = stage_key("build", "v", cfg.build, {})
    RuntimeConfig(device="cpu", progress=False)
    assert k1 == stage_key("build", "v", cfg.build, {})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("build: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs/accelerate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    import yaml

    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert cfg["num_processes"] >= 1 and cfg["mixed_precision"] == "bf16"
