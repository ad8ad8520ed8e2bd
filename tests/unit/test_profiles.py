import pytest

from pipelines.profiles import ProfileError, available_profiles, load_profile


@pytest.mark.parametrize("name", available_profiles())
def test_every_bundled_profile_loads(name):
    profile = load_profile(name)
    assert profile["name"] == name
    assert set(profile["generation"]["generators"]) == {"t2i", "edit", "multi_ref"}
    assert profile["judge"]["backend"] in {"transformers", "vllm", "openai"}


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
