import pytest

from pipelines.profiles import ProfileError, available_profiles, load_profile


@pytest.mark.parametrize("name", available_profiles())
def test_every_bundled_profile_loads(name):
    profile = load_profile(name)
    assert profile["name"] == name
    assert set(profile["generation"]["generators"]) == {"t2i", "edit", "multi_ref"}
    assert profile["judge"]["backend"] in {"transformers", "vllm", "openai", "verifier"}


def test_extends_replaces_whole_sections():
    child, parent = load_profile("tiny_endpoint"), load_profile("tiny")
    assert child["judge"]["backend"] == "openai" and "base_url" in child["judge"]
    assert child["clip"] == parent["clip"] and child["generation"] == parent["generation"]


def test_unknown_profile_names_the_known_ones(tmp_path):
    with pytest.raises(ProfileError, match="tiny"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\njudge: {}\n")
    with pytest.raises(ProfileError, match="lacks sections"):
        load_profile(str(bad))


def test_load_profile_returns_a_fresh_copy():
    load_profile("tiny")["judge"]["batch_size"] = -1
    assert load_profile("tiny")["judge"]["batch_size"] != -1


def test_an_edited_profile_or_parent_is_read_again(tmp_path):
    """A long-lived process (the code server evaluating sensors) loads profiles many times: an edit to the file or
    to the file it extends is seen on the next load, an unchanged one is served from the cache."""
    import os

    parent, child = tmp_path / "parent.yaml", tmp_path / "child.yaml"
    parent.write_text("extends: tiny\nname: parent\nautomation: {min_new_samples: 16}\n")
    child.write_text(f"extends: {parent}\nname: child\n")
    assert load_profile(str(child))["automation"]["min_new_samples"] == 16
    assert load_profile(str(child)) == load_profile(str(child))

    def rewrite(path, text):
        before = path.stat().st_mtime_ns
        path.write_text(text)
        os.utime(path, ns=(before + 10**9, before + 10**9))  # a coarse file-system clock must still see an edit

    rewrite(parent, "extends: tiny\nname: parent\nautomation: {min_new_samples: 64}\n")
    assert load_profile(str(child))["automation"]["min_new_samples"] == 64
    rewrite(child, f"extends: {parent}\nname: child\nautomation: {{min_new_samples: 8}}\n")
    assert load_profile(str(child))["automation"]["min_new_samples"] == 8
    rewrite(child, "name: child\njudge: {}\n")
    with pytest.raises(ProfileError, match="lacks sections"):
        load_profile(str(child))


@pytest.mark.parametrize("name", available_profiles())
def test_every_profiles_training_settings_are_trainer_fields(name):
    """Each trainer section of each bundled profile builds its config dataclass (unknown keys are errors)."""
    from trainers.common import config_from_dict
    from trainers.dpo import DPOConfig
    from trainers.grpo import GRPOConfig
    from trainers.sft import SFTConfig

    training = load_profile(name)["training"]
    assert set(training) - {"model", "tasks", "sft", "dpo", "grpo"} == set()
    for key, cls in (("sft", SFTConfig), ("dpo", DPOConfig), ("grpo", GRPOConfig)):
        cfg = config_from_dict(cls, {**training[key], **({"tasks": training["tasks"]} if training.get("tasks") else {})})
        if isinstance(cfg, GRPOConfig) and cfg.sde_type:
            assert cfg.sde_type in {"ddim", "flow_sde", "dance_sde", "cps"}


def test_default_profile_runs_flow_families_with_native_references():
    from pipelines.zoo import resolve_model
    from trainers.families import FLOW_FAMILIES, detect_family, input_images

    generators = load_profile("tiny")["generation"]["generators"]
    for task, spec in generators.items():
        assert detect_family(resolve_model(spec["model"])) in FLOW_FAMILIES, task
    assert input_images(resolve_model(generators["multi_ref"]["model"])) >= 2
