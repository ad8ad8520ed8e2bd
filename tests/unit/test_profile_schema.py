"""The typed profile (pipelines/profile_schema.py): shipped profiles validate, a typo / wrong type / unknown backend
fails at load naming the key (``check-profile`` and asset runs alike), and the schema's defaults are the ones the
consumers use."""

import dataclasses
import inspect

import pytest
import yaml

from pipelines import profile_schema as schema
from pipelines.cli import main as cli_main
from pipelines.profiles import ProfileError, available_profiles, load_profile


def _profile(tmp_path, text: str, name: str = "custom"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _problems(tmp_path, text: str) -> str:
    with pytest.raises(ProfileError) as info:  # a fresh name each time: profiles are cached by path
        load_profile(str(_profile(tmp_path, text, f"custom{len(list(tmp_path.glob('*.yaml')))}")))
    return str(info.value)


# ------------------------------------------------------------------------------------------------ shipped profiles
@pytest.mark.parametrize("name", available_profiles())
def test_every_shipped_profile_validates_and_resolves_to_itself(name):
    settings = load_profile(name)
    assert schema.resolve(settings) == settings  # the resolved dict is a fixed point of the schema
    assert settings["rewards"]["drs"].keys() >= {"enabled", "k0", "k1", "tau"}


def test_defaults_are_filled_in_and_absent_ones_left_out(tmp_path):
    path = _profile(tmp_path, "extends: tiny\nname: bare\nrewards: {lambda: {t2i: 0.0}}\n"
                              "judge: {backend: transformers, model: 'zoo:judge'}\n")
    settings = load_profile(str(path))
    assert settings["rewards"]["drs"] == {"enabled": False, "k0": schema.DRS_K0, "k1": schema.DRS_K1,
                                          "tau": schema.DRS_TAU}
    assert settings["rewards"]["diversity"] == {"enabled": False, "ema_decay": 0.9}
    judge = settings["judge"]
    assert judge["temperature"] == 0.0 and judge["batch_size"] == 8
    assert "device" not in judge and "cpu_threads" not in judge  # absent: the profile's, filled by the resource
    # pass-through sections: only the keys given (the trainers and the generator hold those defaults)
    assert settings["training"]["sft"] == load_profile("tiny")["training"]["sft"]
    assert "ar_grpo" not in settings


# ------------------------------------------------------------------------------------------------ problems
def test_misspelt_key_is_named_with_a_suggestion(tmp_path):
    message = _problems(tmp_path, "extends: tiny\njudge: {backend: transformers, model: 'zoo:judge', "
                                  "temprature: 1.0}\n")
    assert "judge.temprature: unknown key; did you mean 'temperature'?" in message
    assert "custom0.yaml" in message


def test_wrong_type_is_named(tmp_path):
    message = _problems(tmp_path, "extends: tiny\njudge: {backend: transformers, model: 'zoo:judge', "
                                  "batch_size: eight}\n")
    assert "judge.batch_size: must be a positive integer, got 'eight'" in message
    message = _problems(tmp_path, "extends: tiny\nrewards: {lambda: {t2i: 0.0}, judge_weight: heavy}\n")
    assert "rewards.judge_weight:" in message and "'heavy'" in message


def test_unknown_backend_is_named(tmp_path):
    message = _problems(tmp_path, "extends: tiny\njudge: {backend: vlm, model: x}\n")
    assert "judge.backend: unknown backend 'vlm'" in message and "did you mean 'vllm'?" in message
    assert "judge.backend: missing" in _problems(tmp_path, "extends: tiny\njudge: {model: x}\n")
    message = _problems(tmp_path, "extends: tiny\nclip: {backend: openclip, model: x}\n")
    assert "clip.backend: 'openclip' is not one of" in message and "did you mean 'open_clip'?" in message


def test_temperature_is_rejected_under_vllm(tmp_path):
    """The vLLM judge decodes greedily: JudgeResource used to drop ``temperature`` silently for it."""
    from labelers.judge import VllmJudge

    assert "temperature" not in inspect.signature(VllmJudge.__init__).parameters
    message = _problems(tmp_path, "extends: sdxl_vllm\njudge: {backend: vllm, model: x, temperature: 1.0}\n")
    assert "judge.temperature: not used by the vllm backend (only transformers, openai use it)" in message


def test_keys_of_another_mode_or_strategy_and_nested_keys(tmp_path):
    message = _problems(tmp_path, "extends: tiny\npairs: {mode: pairwise, strategy: all_pairs}\n")
    assert "pairs.strategy: not used by the pairwise mode" in message
    message = _problems(tmp_path, "extends: tiny\npairs: {strategy: best_vs_worst, top_k: 2}\n")
    assert load_profile(str(_profile(tmp_path, "extends: tiny\npairs: {strategy: top_bottom_k, top_k: 2}\n",
                                     "top_k")))["pairs"]["top_k"] == 2
    assert "pairs.top_k: only used by strategy top_bottom_k" in message
    message = _problems(tmp_path, "extends: tiny\nrewards: {lambda: {t2i: 0.0, mutli_ref: 0.7}}\n")
    assert "rewards.lambda.mutli_ref: unknown task" in message and "did you mean 'multi_ref'?" in message
    message = _problems(tmp_path, "extends: tiny\ntraining: {grpo: {sde_typ: flow_sde, lambdas: {}}}\n")
    assert "training.grpo.sde_typ: unknown key; did you mean 'sde_type'?" in message
    assert "training.grpo.lambdas: set from rewards.lambda" in message
    message = _problems(tmp_path, "extends: tiny\ndevise: cuda\nar_grpo: {num_step: 3}\n")
    assert "devise: unknown key; did you mean 'device'?" in message
    assert "ar_grpo.num_step: unknown key; did you mean 'num_steps'?" in message
    message = _problems(tmp_path, "extends: tiny_endpoint\njudge: {backend: openai, model: m, "
                                  "base_url: 'http://h/v1', api_key: secret}\n")
    assert "judge.api_key: never in a profile" in message and "secret" not in message


def test_every_problem_is_listed_once(tmp_path):
    message = _problems(tmp_path, "extends: tiny\ndtype: fp64\njudge: {backend: transformers, model: x, "
                                  "batch_size: 0, temprature: 1}\n")
    lines = [line.strip() for line in message.splitlines()[1:]]
    assert len(lines) == 3 and len(set(lines)) == 3
    assert any(line.startswith("dtype: 'fp64' is not one of") for line in lines)
    assert "3 problems" in message.splitlines()[0]


# ------------------------------------------------------------------------------------------------ check-profile
def test_check_profile_prints_the_resolved_settings(capsys):
    assert cli_main(["check-profile", "tiny_endpoint"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == load_profile("tiny_endpoint")


def test_check_profile_without_a_name_checks_the_environments_profile_else_the_default(monkeypatch, capsys):
    monkeypatch.setenv("PREFMILL_PROFILE", "tiny_endpoint")
    assert cli_main(["check-profile"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "tiny_endpoint"
    monkeypatch.delenv("PREFMILL_PROFILE")
    assert cli_main(["check-profile"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "world"


def test_check_profile_fails_with_exit_2_naming_the_key(tmp_path, capsys):
    path = _profile(tmp_path, "extends: tiny\njudge: {backend: transformers, model: x, temprature: 1.0}\n")
    assert cli_main(["check-profile", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "judge.temprature: unknown key; did you mean 'temperature'?" in captured.err
    assert cli_main(["check-profile", str(_profile(tmp_path, "extends: tiny\njudge: [", "broken"))]) == 2
    assert cli_main(["check-profile", "no_such_profile"]) == 2


# ------------------------------------------------------------------------------------------------ asset runs
def test_an_asset_run_with_a_bad_profile_fails_naming_the_key(tmp_path):
    import dagster as dg

    from assets.prompts import prompt_batches
    from pipelines.partitions import PROMPT_BATCH_PARTITIONS
    from pipelines.resources import default_resources

    inbox = tmp_path / "data" / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "b.jsonl").write_text('{"task": "t2i", "text": "a red cube"}\n')
    bad = _profile(tmp_path, "extends: tiny\njudge: {backend: transformers, model: x, temprature: 1.0}\n")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, ["b"])
    result = dg.materialize([prompt_batches], partition_key="b", instance=instance, raise_on_error=False,
                            resources=default_resources(str(tmp_path / "data"), str(bad)))
    assert not result.success
    error = result.failure_data_for_node("prompt_batches").error
    text = ""
    while error is not None:
        text, error = text + error.message, error.cause
    assert "judge.temprature: unknown key; did you mean 'temperature'?" in text


# ------------------------------------------------------------------------------------------------ one default each
def _init_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _schema_defaults(model) -> dict:
    out = {}
    for name, field in model.model_fields.items():
        if field.default_factory is not None:
            out[field.alias or name] = field.default_factory()
        elif not field.is_required():
            out[field.alias or name] = field.default
    return out


@pytest.mark.parametrize("backend", schema.JUDGE_BACKENDS)
def test_judge_sections_match_their_backends(backend):
    """Each backend's keys are its class's parameters, with the same defaults (the resource passes them on)."""
    from labelers.judge import TransformersJudge, VllmJudge
    from labelers.openai_judge import OpenAIJudge
    from labelers.verifier import VerifierJudge

    cls = {"transformers": TransformersJudge, "vllm": VllmJudge, "openai": OpenAIJudge,
           "verifier": VerifierJudge}[backend]
    section = schema._UNIONS["judge"][1][backend]
    params = _init_defaults(cls)
    keys = set(section.model_fields) - {"backend", "model"}
    assert keys <= set(inspect.signature(cls.__init__).parameters), keys - set(params)
    for key, default in _schema_defaults(section).items():
        if key in params and default is not None:
            assert params[key] == default, (backend, key)


def test_pairs_and_generator_defaults_match_their_consumers():
    from labelers.pairs import select_pairs
    from pipelines.generation import ImageGenerator

    params = _init_defaults(select_pairs)
    params = {n: p.default for n, p in inspect.signature(select_pairs).parameters.items()
              if p.default is not inspect.Parameter.empty}
    pointwise = _schema_defaults(schema.PointwisePairs)
    assert {k: v for k, v in pointwise.items() if k != "mode"} == params
    generator = _init_defaults(ImageGenerator)
    for key, default in _schema_defaults(schema.GeneratorSpec).items():
        assert key in generator and (default is None or generator[key] == default), key


@pytest.mark.parametrize("section,config", [("sft", "trainers.sft:SFTConfig"), ("dpo", "trainers.dpo:DPOConfig"),
                                            ("grpo", "trainers.grpo:GRPOConfig"),
                                            ("ar_grpo", "trainers.ar_grpo.ar_grpo_config:ARGRPOConfig")])
def test_trainer_sections_match_their_config_dataclasses(section, config):
    import importlib

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    model = schema.ArGrpo if section == "ar_grpo" else schema.Training.model_fields[section].annotation
    for key, default in _schema_defaults(model).items():
        if section == "ar_grpo" and key == "model":
            continue
        assert key in fields, key
        field = fields[key]
        expected = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if key == "reward_dimensions":
            from labelers.rubrics import load_rubric

            expected = list(load_rubric("t2i").dimension_names)
        assert expected == default, (section, key)
    # every dataclass field is either a profile key or set by the asset (the hints say from where)
    settable = set(model.model_fields) | set(model._hints)
    assert set(fields) - settable == set(), set(fields) - settable


def test_reward_defaults_have_one_home():
    """λ, DRS, the reward weights and the feedback length live in labelers.defaults, DyRef's DAR weights in
    trainers.losses, min_new_samples in the schema: every other module (the schema included) imports them, so the
    schema's default IS the consumer's."""
    from labelers import defaults, rewards, stage
    from pipelines import automation
    from trainers import losses
    from trainers.grpo import GRPOConfig

    names = ("DEFAULT_LAMBDAS", "DEFAULT_LAMBDA", "DRS_K0", "DRS_K1", "DRS_TAU", "JUDGE_WEIGHT", "CLIP_WEIGHT",
             "FEEDBACK_MAX_CHARS")
    for name in names:  # re-exported, not copied
        assert getattr(schema, name) is getattr(defaults, name), name
    assert stage.DEFAULT_LAMBDAS is defaults.DEFAULT_LAMBDAS
    assert losses.DYREF_DRS_TAU is defaults.DRS_TAU
    assert automation.DEFAULT_MIN_NEW_SAMPLES is schema.DEFAULT_MIN_NEW_SAMPLES
    # the schema's defaults are the constants
    assert _schema_defaults(schema.Rewards)["lambda"] == dict(defaults.DEFAULT_LAMBDAS)
    assert _schema_defaults(schema.Drs) == {"enabled": False, "k0": defaults.DRS_K0, "k1": defaults.DRS_K1,
                                            "tau": defaults.DRS_TAU}
    for key, name in (("judge_weight", "JUDGE_WEIGHT"), ("clip_weight", "CLIP_WEIGHT")):
        assert schema.Rewards.model_fields[key].default is getattr(defaults, name)
    assert schema.Automation.model_fields["min_new_samples"].default is schema.DEFAULT_MIN_NEW_SAMPLES
    grpo = schema.GrpoTrainer.model_fields
    assert grpo["default_lambda"].default is defaults.DEFAULT_LAMBDA
    assert (grpo["dar_gamma"].default, grpo["dar_w_min"].default, grpo["dar_w_max"].default) == (
        losses.DYREF_DAR_GAMMA, losses.DYREF_DAR_W_MIN, losses.DYREF_DAR_W_MAX)
    for backend in schema.JUDGE_BACKENDS:
        assert schema._UNIONS["judge"][1][backend].model_fields["feedback_max_chars"].default \
            is defaults.FEEDBACK_MAX_CHARS
    # ... and so are the consumers'
    drs = _init_defaults(type("F", (), {"__init__": rewards.drs_clip_i}))
    assert (drs["k0"], drs["k1"], drs["tau"]) == (defaults.DRS_K0, defaults.DRS_K1, defaults.DRS_TAU)
    weights = inspect.signature(rewards.aggregate_reward).parameters
    assert (weights["judge_weight"].default, weights["clip_weight"].default) == (defaults.JUDGE_WEIGHT,
                                                                                 defaults.CLIP_WEIGHT)
    config = GRPOConfig()
    assert config.lambdas == dict(defaults.DEFAULT_LAMBDAS) and config.lambdas is not GRPOConfig().lambdas
    assert (config.drs_k0, config.drs_k1, config.drs_tau, config.default_lambda) == (
        defaults.DRS_K0, defaults.DRS_K1, defaults.DRS_TAU, defaults.DEFAULT_LAMBDA)
    assert (config.dar_gamma, config.dar_w_min, config.dar_w_max) == (losses.DYREF_DAR_GAMMA,
                                                                     losses.DYREF_DAR_W_MIN, losses.DYREF_DAR_W_MAX)
    with pytest.raises(TypeError):  # the shared λ table is read-only: consumers copy it
        defaults.DEFAULT_LAMBDAS["t2i"] = 1.0


def test_the_judge_protocol_feedback_length_is_the_default():
    """labelers.judge.protocol still writes its own FEEDBACK_MAX_CHARS (that package is not this change's); keep it
    equal to labelers.defaults' until it imports it from there."""
    from labelers import defaults
    from labelers.judge import FEEDBACK_MAX_CHARS

    assert FEEDBACK_MAX_CHARS == defaults.FEEDBACK_MAX_CHARS


def test_defaults_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, labelers.defaults, trainers.losses; "
            "print(sorted(m for m in ('dagster', 'torch', 'numpy', 'pydantic', 'polars', 'pipelines') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------ factories
def _drs_profile(tmp_path, drs: str, name: str):
    return load_profile(str(_profile(tmp_path, f"extends: tiny\nrewards: {{lambda: {{t2i: 0.0, edit: 0.4}}, "
                                               f"drs: {drs}, judge_weight: 0.25}}\n", name)))


@pytest.mark.parametrize("drs", ["{enabled: true, k0: 8, tau: 0.6}", "{enabled: false}"])
def test_labeling_stage_factory_builds_what_the_asset_built_inline(tmp_path, drs):
    from labelers.stage import LabelingStage
    from pipelines.stages import drs_from_profile, labeling_stage_from_profile, rewards_section

    settings = _drs_profile(tmp_path, drs, "drs_on" if "true" in drs else "drs_off")
    rewards = settings["rewards"]
    scorer = object()  # the stage only keeps it
    inline = LabelingStage(  # what assets/labels.py and assets/evals.py did
        judge=None, scorer=scorer, lambdas=rewards["lambda"],
        drs=rewards.get("drs") if rewards.get("drs", {}).get("enabled") else None,
        judge_weight=rewards.get("judge_weight", 0.5), clip_weight=rewards.get("clip_weight", 0.5))
    for section in (settings, rewards, rewards_section(rewards)):  # the profile, its section, the typed section
        stage = labeling_stage_from_profile(section, judge=None, scorer=scorer)
        assert (stage.lambdas, stage.drs, stage.judge_weight, stage.clip_weight) == (
            inline.lambdas, inline.drs, inline.judge_weight, inline.clip_weight)
        assert stage.config_id() == inline.config_id()  # the label-set version is unchanged
    assert stage.lambdas == {"t2i": 0.0, "edit": 0.4, "multi_ref": 0.5}  # a task not given: the default λ
    assert drs_from_profile(rewards) == ({"k0": 8.0, "k1": schema.DRS_K1, "tau": 0.6} if "true" in drs else None)


def test_grpo_reward_factory_gives_the_keys_the_asset_wrote_inline(tmp_path):
    from pipelines.stages import grpo_rewards_from_profile

    for drs, name in (("{enabled: true, k1: 2}", "g_on"), ("{enabled: false}", "g_off")):
        rewards = _drs_profile(tmp_path, drs, name)["rewards"]
        old = {"lambdas": rewards["lambda"], "use_drs": bool(rewards["drs"].get("enabled")),
               "drs_k0": rewards["drs"].get("k0", 10.0), "drs_k1": rewards["drs"].get("k1", 3.0),
               "drs_tau": rewards["drs"].get("tau", 0.65)}
        new = grpo_rewards_from_profile(rewards)
        assert new == old and list(new) == list(old)
        assert all(type(new[k]) is type(old[k]) for k in old)  # same JSON, so the same GRPO run directory


@pytest.mark.parametrize("pairs", ["{strategy: top_bottom_k, top_k: 2, tau: 0.2}", "{strategy: best_vs_worst}",
                                   "{mode: pairwise, max_pairs_per_prompt: 3}"])
def test_pair_selector_factory(tmp_path, pairs):
    from labelers.pairs import select_pairs
    from pipelines.stages import PairwiseSelector, PointwiseSelector, pair_selector_from_profile

    settings = load_profile(str(_profile(tmp_path, f"extends: tiny\npairs: {pairs}\n", "pairs")))
    section = dict(settings["pairs"])
    mode = section.pop("mode", "pointwise")
    selector = pair_selector_from_profile(settings)
    assert selector.mode == mode and pair_selector_from_profile(settings["pairs"]) == selector
    if mode == "pointwise":
        assert isinstance(selector, PointwiseSelector)
        assert selector.kwargs == section  # every key the schema filled in: select_pairs' arguments
        assert set(selector.kwargs) <= set(inspect.signature(select_pairs).parameters)
    else:
        assert isinstance(selector, PairwiseSelector)
        assert selector.settings == {"max_pairs_per_prompt": 3, "bt_prior": 0.1, "tie_policy": "drop"}
        # a selector built in code takes the schema's defaults, so pairwise_partition needs no copies of them
        assert PairwiseSelector().settings == {"max_pairs_per_prompt": 6, "bt_prior": 0.1, "tie_policy": "drop"}


def test_pointwise_selector_selects_pairs():
    import polars as pl

    from pipelines.stages import pair_selector_from_profile

    labels = pl.DataFrame({"candidate_id": ["a", "b", "c"], "prompt_id": ["p"] * 3, "reward": [0.9, 0.1, 0.5],
                           "status": ["ok"] * 3})
    selector = pair_selector_from_profile({"mode": "pointwise", "strategy": "best_vs_worst"})
    pairs, _ = selector(labels)
    assert pairs.select("chosen_id", "rejected_id").rows() == [("a", "b")]


@pytest.mark.parametrize("name", ["tiny", "tiny_endpoint", "proving", "verifier"])
def test_judge_factory_builds_the_backend_with_the_profile_settings(tmp_path, name):
    from pipelines.stages import judge_from_profile, judge_section

    settings = load_profile(name if name != "verifier" else str(_profile(
        tmp_path, "extends: tiny\njudge: {backend: verifier, batch_size: 16}\n", name)))
    judge = judge_from_profile(settings, device="cpu", api_key="k")  # not set up: nothing is loaded
    section = judge_section(settings)
    assert type(judge).__name__ == {"transformers": "TransformersJudge", "openai": "OpenAIJudge",
                                    "verifier": "VerifierJudge", "vllm": "VllmJudge"}[section.backend]
    assert judge.batch_size == section.batch_size == settings["judge"]["batch_size"]
    assert judge.max_retries == section.max_retries
    if section.backend == "transformers":
        assert (judge.device, judge.dtype, judge.cpu_threads) == ("cpu", settings["dtype"], settings["cpu_threads"])
        assert judge.temperature == section.temperature


def test_schema_imports_no_dagster():
    import subprocess
    import sys

    code = ("import sys, pipelines.profile_schema; "
            "print(sorted(m for m in ('dagster', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
