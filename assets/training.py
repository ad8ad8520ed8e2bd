"""sft_run, dpo_run, grpo_run (and ar_grpo_run when the profile has an ``ar_grpo`` section): trainers launched out of process through Dagster Pipes.

Each asset writes the trainer's config into a run directory keyed by its input version and config, runs
``python -m trainers.<name> --config FILE`` with ``PipesSubprocessClient`` (metrics and logs stream into the
Dagster run), and reports the adapter path. A run directory that already holds a result is reused, so training
happens only when its input corpus version (or config) changed. In production swap the client for one that
runs ``accelerate launch`` or a cluster job; the trainer side is the same."""


import json
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from assets._metadata import curves_md, path_md
from assets.corpora import preference_corpus, sft_corpus
from assets.pool import rl_prompt_pool
from pipelines.resources import ProfileResource, StorageResource


# what each trainer's curves show in the UI (keys of its metrics.jsonl)
CURVE_KEYS = {"sft": ["loss"], "dpo": ["loss", "implicit_acc", "margin", "reward_w", "reward_l"],
              "grpo": ["reward_mean", "loss", "kl", "heldout_lambda_harmonic"],
              "ar_grpo": ["reward_mean", "loo_fid_mean", "diversity", "token_entropy", "entropy_coef", "kl",
                          "heldout_lambda_harmonic"]}


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return rows


def _launch(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient, storage: StorageResource,
            trainer: str, inputs: dict[str, Any], config: dict[str, Any],
            run_name: str | None = None) -> dg.MaterializeResult:
    """Run ``trainers.<trainer>`` on ``config``; its run directory lives under ``runs/<run_name>`` (default: the
    trainer's name; the proving ground's controls run a trainer under another name)."""
    from pipelines.runs import finished_result, point_latest, run_dir

    run_name = run_name or trainer
    directory = run_dir(storage.layout, run_name, inputs, config)
    result = finished_result(directory)
    reported: dict[str, Any] = {}
    if result is None:
        directory.mkdir(parents=True, exist_ok=True)
        config_path = directory / "config.json"
        config_path.write_text(json.dumps({**config, "output_dir": str(directory)}, indent=2))
        invocation = pipes.run(
            command=[sys.executable, "-m", f"trainers.{trainer}", "--config", str(config_path)],
            context=context, extras={"run_dir": str(directory), "inputs": inputs},
        )
        for event in invocation.get_results():
            if isinstance(event, dg.MaterializeResult):
                reported.update(event.metadata or {})
        result = finished_result(directory)
        if result is None:
            raise dg.Failure(f"trainers.{trainer} exited without writing {directory / 'result.json'}")
    else:
        context.log.info(f"{trainer}: inputs and config unchanged, reusing {directory}")
    point_latest(storage.layout, run_name, directory)
    metrics = {k: v for k, v in result.get("final_metrics", {}).items() if isinstance(v, (int, float))}
    history = _read_metrics(directory / "metrics.jsonl")
    return dg.MaterializeResult(
        metadata={
            **reported,
            **{f"final_{k}": float(v) for k, v in metrics.items()},
            "steps": int(result.get("steps", 0)),
            "training_curves": curves_md(history, CURVE_KEYS.get(trainer, ["loss"])),
            "adapter": path_md(result["adapter_path"]),
            "run_dir": path_md(directory),
            "reused": not reported,
        },
        data_version=dg.DataVersion(directory.name),
    )


def _corpus_input(storage: StorageResource, corpus: str) -> tuple[str, str]:
    from pipelines.corpora import latest_version, version_url

    root = storage.corpus_root(corpus)
    version = latest_version(root)
    if version is None:
        raise dg.Failure(f"no {corpus} version yet under {root}; materialize {corpus} first")
    return version_url(root, version), version


def _train_on_corpus(context: dg.AssetExecutionContext, pipes: dg.PipesSubprocessClient, storage: StorageResource,
                     profile: ProfileResource, trainer: str, corpus: str, run_name: str | None = None,
                     **overrides: Any) -> dg.MaterializeResult:
    """Train on the latest version of ``corpus``; the run is keyed by that version, so it retrains only when the
    corpus (or the trainer's config) changed."""
    corpus_dir, version = _corpus_input(storage, corpus)
    _, config = _trainer_settings(profile, trainer)
    config["corpus_dir"] = str(corpus_dir)
    config.update(overrides)
    return _launch(context, pipes, storage, trainer, {corpus: version}, config, run_name)


def training_model(settings: dict[str, Any]) -> str:
    """The checkpoint the trainers fine-tune: ``training.model``, else the multi_ref generator's model when it takes
    several input images (DyRef trains its multi-image edit model on every task), else the t2i generator's."""
    from pipelines.zoo import resolve_model
    from trainers.families import input_images

    training = settings["training"]
    if training.get("model"):
        return str(training["model"])
    generators = settings["generation"]["generators"]
    multi = generators["multi_ref"]["model"]
    return multi if input_images(resolve_model(multi)) > 1 else generators["t2i"]["model"]


def _trainer_settings(profile: ProfileResource, trainer: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from pipelines.zoo import resolve_model

    settings = profile.settings()
    base = dict(settings["training"][trainer])
    base.setdefault("resolution", settings["generation"]["generators"]["t2i"].get("width", 512))
    if settings["training"].get("tasks"):
        # the tasks the trained model learns; samples of other tasks are skipped (and counted by the trainers)
        base.setdefault("tasks", list(settings["training"]["tasks"]))
    if settings.get("cpu_threads"):
        base.setdefault("num_threads", settings["cpu_threads"])
    return settings, {"pretrained_model": resolve_model(training_model(settings)), **base}


def grpo_settings(storage: StorageResource, profile: ProfileResource, **overrides: Any
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs, config) of a GRPO run on the RL prompt pool with the profile's rewards; ``overrides`` last."""
    from labelers.hashing import content_id
    from pipelines.io import file_sha256
    from pipelines.stages import grpo_rewards_from_profile
    from pipelines.zoo import resolve_model

    pool_path = storage.layout.asset_dir("rl_prompt_pool") / "pool.parquet"
    if not pool_path.exists():
        raise dg.Failure(f"no RL prompt pool at {pool_path}; materialize rl_prompt_pool first")
    settings, config = _trainer_settings(profile, "grpo")
    config.update(
        prompt_pool=str(pool_path),
        clip_model=resolve_model(settings["clip"]["model"]), clip_backend=settings["clip"].get("backend", "open_clip"),
    )
    config.update(grpo_rewards_from_profile(settings["rewards"]))  # lambdas, use_drs, drs_k0, drs_k1, drs_tau
    config.update(overrides)
    return {"rl_prompt_pool": content_id(file_sha256(pool_path))[:16]}, config


# When training runs wait for pool slots (one per GPU), the SFT -> GRPO chain goes first: it is the longest path to
# the evaluations (GRPO waits for SFT), so starting it early shortens the whole run; longer runs before shorter
# ones after that (Dagster starts a run's waiting steps in descending dagster/priority).
CRITICAL_PATH = {"dagster/priority": "2"}
LONG_RUN = {"dagster/priority": "1"}


@dg.asset(deps=[sft_corpus], group_name="training", kinds={"pytorch", "peft"}, pool="gpu",
          op_tags=CRITICAL_PATH)
def sft_run(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
            pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """LoRA SFT of the text-to-image denoiser on the SFT corpus (DyRef's first stage)."""
    return _train_on_corpus(context, pipes_subprocess_client, storage, profile, "sft", "sft_corpus")


@dg.asset(deps=[preference_corpus], group_name="training", kinds={"pytorch", "peft"}, pool="gpu")
def dpo_run(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
            pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """Diffusion-DPO of a LoRA on the preference corpus against the frozen base as reference."""
    return _train_on_corpus(context, pipes_subprocess_client, storage, profile, "dpo", "preference_corpus")


@dg.asset(deps=[sft_run, rl_prompt_pool], group_name="training", kinds={"pytorch", "peft"}, pool="gpu",
          op_tags=CRITICAL_PATH)
def grpo_run(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
             pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """GRPO from the SFT adapter (DyRef's second stage): online groups scored with CLIP λ-Harmonic, DRS-sharpened
    reference similarities, DAR focal group weights; held-out λ-Harmonic picks the checkpoint kept."""
    from pipelines.runs import latest_run

    sft_dir = latest_run(storage.layout, "sft")
    if sft_dir is None:
        raise dg.Failure("grpo_run starts from the SFT adapter: materialize sft_run first")
    sft_result = json.loads((sft_dir / "result.json").read_text())
    inputs, config = grpo_settings(storage, profile, init_adapter=sft_result["adapter_path"])
    inputs["sft_run"] = sft_dir.name
    return _launch(context, pipes_subprocess_client, storage, "grpo", inputs, config)


def ar_grpo_settings(storage: StorageResource, profile: ProfileResource, **overrides: Any
                     ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(inputs, config) of an AR GRPO run (``trainers.ar_grpo``), or None when the profile has no top-level
    ``ar_grpo`` section. The model is ``ar_grpo.model`` (default: the t2i generator's); CLIP_T and
    the LOO-FID features use the profile's CLIP, the preference component its ``clip.preference_model``; the LOO-FID
    reference starts from the labelling stage's EMA moments of the candidates' CLIP features when they exist
    (``reward_labels/_diversity``), else from the initial policy's samples."""
    from labelers.defaults import DEFAULT_LAMBDAS
    from labelers.hashing import content_id
    from pipelines.io import file_sha256
    from pipelines.stages import rewards_section
    from pipelines.zoo import resolve_model

    settings = profile.settings()
    section = settings.get("ar_grpo")
    if not section:
        return None
    spec = {k: v for k, v in dict(section).items() if v is not None}  # unset keys: the trainer's defaults
    pool_path = storage.layout.asset_dir("rl_prompt_pool") / "pool.parquet"
    if not pool_path.exists():
        raise dg.Failure(f"no RL prompt pool at {pool_path}; materialize rl_prompt_pool first")
    model = spec.pop("model", None) or settings["generation"]["generators"]["t2i"]["model"]
    clip = settings["clip"]
    lambdas = rewards_section(settings["rewards"]).lambda_
    config: dict[str, Any] = {"pretrained_model": resolve_model(model), "prompt_pool": str(pool_path),
                              "clip_model": resolve_model(clip["model"]),
                              "clip_backend": clip.get("backend", "open_clip"),
                              "lambdas": {"t2i": float(lambdas.get("t2i", DEFAULT_LAMBDAS["t2i"]))}}
    if clip.get("preference_model"):
        config.update(preference_model=resolve_model(clip["preference_model"]),
                      preference_backend=clip.get("preference_backend", "transformers"))
    if settings.get("cpu_threads"):
        config["num_threads"] = settings["cpu_threads"]
    inputs = {"rl_prompt_pool": content_id(file_sha256(pool_path))[:16]}
    moments = storage.layout.asset_dir("reward_labels") / "_diversity" / "clip_feature_moments.safetensors"
    if "fid_reference_moments" not in spec and moments.exists():
        config["fid_reference_moments"] = str(moments)
        inputs["fid_reference_moments"] = content_id(file_sha256(moments))[:16]
    config.update(spec)
    config.update(overrides)
    return inputs, config


@dg.asset(deps=[rl_prompt_pool], group_name="training", kinds={"pytorch", "peft"}, pool="gpu",
          output_required=False)
def ar_grpo_run(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                pipes_subprocess_client: dg.PipesSubprocessClient):
    """GRPO of an autoregressive VQ-token generator (Janus) with the leave-one-out FID reward, composite CLIP /
    preference instance rewards and an adaptive entropy regulariser (``python -m trainers.ar_grpo``). Runs only when
    the profile has an ``ar_grpo`` section (e.g. ``tiny_ar``); otherwise nothing is materialized."""
    settings = ar_grpo_settings(storage, profile)
    if settings is None:
        context.log.info("profile has no ar_grpo section: ar_grpo_run skipped")
        return
    inputs, config = settings
    yield _launch(context, pipes_subprocess_client, storage, "ar_grpo", inputs, config)
