"""Typed configuration: defaults, YAML + overrides, and the error messages of bad configurations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from uniopd_mcore.config import ConfigError, JobConfig, TeacherConfig, load_config, save_config, to_yaml, validate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
TEACHER = "teachers=[{name: t, engine: embedded, model_path: models/t}]"


def test_defaults_load_and_match_released_recipe():
    cfg = load_config(None, [])
    assert isinstance(cfg, JobConfig)
    assert cfg.rollout.n_samples_per_prompt == 16 and cfg.trainer.prompts_per_step == 64
    assert cfg.trainer.global_batch_sequences == 1024  # derived: prompts x n
    assert (cfg.recipe.margin, cfg.recipe.eps_low, cfg.recipe.eps_high) == (0.4, 0.2, 0.28)
    assert (cfg.optimizer.lr, cfg.optimizer.adam_beta2, cfg.optimizer.warmup_steps) == (1e-6, 0.98, 5)
    assert cfg.checkpoint.dir == os.path.join(cfg.logging.run_dir, "checkpoints")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("recipe:\n  margin: 0.3\n  statistic: minmax\ntrainer:\n  steps: 7\n")
    cfg = load_config(str(path), [
        "recipe.margin=0.5", "--optimizer.lr=2e-6", "rollout.sglang.extra_args.chunked_prefill_size=4096",
        TEACHER, "data.sources.math.teacher=t", "teachers.0.servers=[http://h:1]"])
    assert cfg.recipe.margin == 0.5 and cfg.recipe.statistic == "minmax" and cfg.trainer.steps == 7
    assert cfg.optimizer.lr == 2e-6
    assert cfg.rollout.sglang.extra_args == {"chunked_prefill_size": "4096"}
    assert isinstance(cfg.teachers[0], TeacherConfig) and cfg.teachers[0].servers == ["http://h:1"]
    assert cfg.data.sources["math"].teacher == "t" and cfg.data.sources["math"].verifier == "math"


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(str(EXAMPLES / "demo_cpu.yaml"), ["recipe.direction=correct_up"])
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(str(tmp_path / "sub" / "config.yaml"), []) == cfg
    assert "direction: correct_up" in to_yaml(cfg)


@pytest.mark.parametrize("name", ["qwen3_30b_a3b_to_4b.yaml", "demo_cpu.yaml"])
def test_example_configs_validate(name):
    cfg = load_config(str(EXAMPLES / name), [])  # model dirs need not exist yet
    assert cfg.teachers and cfg.data.sources
    for source in cfg.data.sources.values():
        assert source.teacher in {t.name for t in cfg.teachers}


def test_released_recipe_numbers():
    cfg = load_config(str(EXAMPLES / "qwen3_30b_a3b_to_4b.yaml"), [])
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.sequence_parallel
    assert cfg.rollout.max_response_len == 16384 and cfg.rollout.sglang.mem_fraction_static == 0.75
    assert cfg.trainer.global_batch_sequences == 1024 and cfg.trainer.steps == 50
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.parallel.data_parallel_size(16) == 8


@pytest.mark.parametrize("override, message", [
    ("foo=1", r"override 'foo=1': unknown key 'foo' \(top-level sections are: model, parallel"),
    ("recipe.margni=1", r"unknown key 'recipe.margni'; did you mean 'recipe.margin'\? \(recipe has: margin,"),
    ("rollout.sglang.port=1", r"unknown key 'rollout.sglang.port'; did you mean 'rollout.sglang.base_port'"),
    ("recipe.margin=abc", r"recipe.margin: expected float, got 'abc'"),
    ("parallel.sequence_parallel=maybe", r"parallel.sequence_parallel: expected bool, got 'maybe'"),
    ("model.seed=null", r"model.seed: expected int, got null"),
    ("data.train_files=abc", r"data.train_files: expected list\[str\], got 'abc'"),
    ("recipe.statistic=median", r"recipe.statistic: 'median' is not one of \['mean', 'minmax'\]"),
    ("model.dtype=fp8", r"model.dtype: 'fp8' is not one of \['bfloat16', 'float32', 'float16'\]"),
    ("recipe.margin=-0.1", r"recipe.margin: must be >= 0, got -0.1"),
    ("recipe.eps_low=1.5", r"recipe.eps_low: must be in \[0, 1\), got 1.5"),
    ("recipe.balance_ratio=-1", r"recipe.balance_ratio: must be > 0"),
    ("parallel.sequence_parallel=true", r"parallel.sequence_parallel: needs parallel.tensor_model_parallel_size > 1"),
    ("trainer.global_batch_sequences=100", r"trainer.global_batch_sequences: 100 must divide the 1024 sequences"),
    ("recipe", r"override 'recipe' must look like section.key=value"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_nested_entry_errors_name_full_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teachers:\n  - {name: a, model_path: x}\n  - {name: b, model_path: x, timeout: 3}\n")
    with pytest.raises(ConfigError,
                       match=r"bad.yaml': unknown key 'teachers.1.timeout'; did you mean 'teachers.1.timeout_s'"):
        load_config(str(path), [])
    path.write_text("data:\n  sources:\n    math: {teacher: a, verfier: math}\n")
    with pytest.raises(ConfigError,
                       match=r"unknown key 'data.sources.math.verfier'; did you mean 'data.sources.math.verifier'"):
        load_config(str(path), [])
    with pytest.raises(ConfigError, match=r"teachers.0.max_retries: expected int, got 'lots'"):
        load_config(None, [TEACHER, "teachers.0.max_retries=lots"])
    with pytest.raises(ConfigError, match=r"teachers has 1 entries, so index 3 does not exist"):
        load_config(None, [TEACHER, "teachers.3.name=x"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"), [])
    (tmp_path / "broken.yaml").write_text("recipe: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml' is not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"), [])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(str(tmp_path / "list.yaml"), [])


def test_undefined_teacher_and_unknown_verifier():
    with pytest.raises(ConfigError,
                       match=r"data.sources.chem.teacher: 'chemist' is not defined in teachers \(known: t\)"):
        load_config(None, [TEACHER, "data.sources.chem.teacher=chemist"])
    with pytest.raises(ConfigError,
                       match=r"data.sources.math.verifier: 'nope' is not one of \[.*'integer', 'math'\]"):
        load_config(None, [TEACHER, "data.sources.math.teacher=t", "data.sources.math.verifier=nope"])
    # dotted-path verifiers are accepted when they import
    cfg = load_config(None, [TEACHER, "data.sources.x.teacher=t",
                             "data.sources.x.verifier=uniopd_mcore.rewards.exact:integer_match"])
    assert cfg.data.sources["x"].verifier.endswith("integer_match")


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError, match=r"\(3 problems\)") as info:
        load_config(None, ["recipe.margin=-1", "optimizer.lr=0", "rollout.top_p=1.5"])
    assert all(key in str(info.value) for key in ("recipe.margin", "optimizer.lr", "rollout.top_p"))


def _student(tmp_path, heads=6, kv_heads=3, layers=2):
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps(
        {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers}))
    return str(student)


def test_tp_must_divide_student_heads(tmp_path):
    student = _student(tmp_path)
    load_config(None, [f"model.student={student}", "parallel.tensor_model_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"parallel.tensor_model_parallel_size: 2 does not divide the student's "
                                          r"num_key_value_heads = 3"):
        load_config(None, [f"model.student={student}", "parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"parallel.pipeline_model_parallel_size: 4 is more than the student's "
                                          r"num_hidden_layers = 2"):
        load_config(None, [f"model.student={student}", "parallel.pipeline_model_parallel_size=4"])
    # A student directory that does not exist yet is not checked.
    load_config(None, [f"model.student={tmp_path / 'later'}", "parallel.tensor_model_parallel_size=4"])


def test_world_size_checks():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2"])
    assert cfg.parallel.data_parallel_size(8) == 4
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of .* = 2 x 1 = 2"):
        cfg.parallel.data_parallel_size(3)
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match="parallel: world size 3"):
        validate(cfg, world_size=3)
