"""Trainer configs read from files and ``--set``: numbers YAML leaves as strings are converted or refused by name."""

import pytest

from trainers.config_io import _parse_override, config_from_dict, load_config
from trainers.dpo import DPOConfig
from trainers.grpo import GRPOConfig
from trainers.sft import SFTConfig


def test_set_learning_rate_in_exponent_form_becomes_a_float():
    # PyYAML reads "1e-2" (no dot) as a string; torch's optimizer then failed with "'<=' not supported"
    key, value = _parse_override("learning_rate=1e-2")
    assert value == "1e-2"
    cfg = config_from_dict(GRPOConfig, {key: value, "num_steps": "48"})
    assert cfg.learning_rate == 0.01 and isinstance(cfg.learning_rate, float)
    assert cfg.num_steps == 48 and isinstance(cfg.num_steps, int)


def test_yaml_config_file_with_exponent_numbers_loads(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("learning_rate: 5e-5\nmax_steps: 10\n")
    cfg = load_config(SFTConfig, path)
    assert cfg.learning_rate == 5e-5 and cfg.max_steps == 10


@pytest.mark.parametrize(("key", "value", "message"), [
    ("learning_rate", "fast", "DPOConfig.learning_rate must be a number, got 'fast'"),
    ("max_steps", "2.5", "DPOConfig.max_steps must be an integer, got '2.5'"),
])
def test_a_numeric_field_given_text_is_refused_by_name(key, value, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        config_from_dict(DPOConfig, {key: value})


def test_text_fields_stay_text():
    cfg = config_from_dict(GRPOConfig, {"advantage": "grpo", "sde_type": "flow_sde"})
    assert cfg.advantage == "grpo" and cfg.sde_type == "flow_sde"
