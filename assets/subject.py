"""subject_run: subject-driven RPO (``python -m trainers.rpo``) launched out of process through Dagster Pipes.

A subject is the asset's config: a directory of 3-5 reference images, a class noun and prompt templates. The run
directory is keyed by the images' content and the config (``assets.training._launch``), so re-materializing an
unchanged subject reuses its LoRA. Left empty, ``subject_dir`` draws the project's demo subject (a large purple
triangle, :mod:`pipelines.subject`) into the asset's storage. Output: the selected LoRA, the per-round validation
λ-Harmonic curve, and CLIP-I / CLIP-T on held-out prompts for the base model and the selected checkpoint."""

import json
import re
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets._metadata import path_md
from assets.training import _launch
from pipelines.resources import ProfileResource, StorageResource


class SubjectRunConfig(dg.Config):
    """One subject: its reference images and how to prompt for it (``{subject}`` -> "<identifier> <class_noun>")."""

    subject_dir: str = Field("", description="directory of 3-5 reference images; empty: the demo subject")
    class_noun: str = Field("triangle", description="the subject's class, e.g. 'dog' (CLIP-T uses it alone)")
    identifier: str = Field("sks", description="rare token bound to the subject")
    instance_prompt: str = "a photo of {subject}"
    prompt_templates: list[str] = ["a {subject} on a white background", "a {subject} on a grey background",
                                   "a {subject} on a black background", "a photo of a {subject}"]
    validation_prompts: list[str] = ["a {subject} in the middle on a white background", "a picture of a {subject}"]
    heldout_prompts: list[str] = ["an image of a {subject}", "a {subject} on a dark background"]
    model: str = Field("", description="checkpoint to fine-tune; empty: the profile's t2i generator model")
    rounds: int = 4
    steps_per_round: int = 8
    candidates_per_prompt: int = 4
    lam: float = Field(0.5, description="λ of λ-Harmonic")
    beta: float = 500.0
    recon_weight: float = 1.0
    patience: int = 2
    learning_rate: float = 1e-4  # the tiny random zoo models need ~1e-2 to move in a few rounds
    lora_rank: int = 8


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "subject"


def _curve_md(curve: list[dict]) -> dg.MetadataValue:
    def f(v):
        return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"

    lines = ["| round | step | val λ-Harmonic | val CLIP-I | val CLIP-T | pairs |", "|---|---|---|---|---|---|"]
    for c in curve:
        lines.append(f"| {c.get('round')} | {c.get('step')} | {f(c.get('val_lambda_harmonic'))} | "
                     f"{f(c.get('val_clip_i'))} | {f(c.get('val_clip_t'))} | {c.get('n_pairs', '–')} |")
    return dg.MetadataValue.md("\n".join(lines))


@dg.asset(group_name="subject", kinds={"pytorch", "peft"}, pool="gpu")
def subject_run(context: dg.AssetExecutionContext, config: SubjectRunConfig, storage: StorageResource,
                profile: ProfileResource, pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """RPO on one subject: candidates of the current LoRA scored with λ-Harmonic against the references,
    Bradley-Terry pairs, Diffusion-DPO + reconstruction on the references; validation λ-Harmonic selects the LoRA."""
    from labelers.hashing import content_id
    from pipelines.io import file_sha256
    from pipelines.runs import latest_run
    from pipelines.subject import write_subject
    from pipelines.zoo import resolve_model
    from trainers.rpo import RPOConfig
    from trainers.rpo.rpo_trainer import subject_image_paths

    settings = profile.settings()
    t2i = settings["generation"]["generators"]["t2i"]
    resolution = int(t2i.get("width", 512))
    subject_dir = config.subject_dir
    if not subject_dir:
        subject_dir = str(storage.layout.asset_dir("subject_run") / f"demo_subject_{resolution}")
        write_subject(subject_dir, n=4, size=max(48, min(128, resolution)))
    trainer_config = {k: getattr(config, k) for k in SubjectRunConfig.model_fields if k != "model"}
    trainer_config.update(
        subject_dir=str(Path(subject_dir).resolve()),
        pretrained_model=resolve_model(config.model or t2i["model"]),
        resolution=resolution,
        clip_model=resolve_model(settings["clip"]["model"]),
        clip_backend=settings["clip"].get("backend", "open_clip"),
        sample_steps=int(t2i.get("steps", 6)),
    )
    if settings.get("cpu_threads"):
        trainer_config["num_threads"] = settings["cpu_threads"]
    try:
        paths = subject_image_paths(RPOConfig(subject_dir=trainer_config["subject_dir"]))
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc
    inputs = {"subject": content_id("|".join(file_sha256(Path(p)) for p in paths))[:16], "n_images": len(paths)}
    run_name = f"subject_{_slug(config.class_noun)}"
    launched = _launch(context, pipes_subprocess_client, storage, "rpo", inputs, trainer_config, run_name=run_name)

    directory = latest_run(storage.layout, run_name)
    result = json.loads((directory / "result.json").read_text())
    metadata = dict(launched.metadata or {})
    metadata["lora"] = path_md(result["adapter_path"])
    metadata["lambda_harmonic_curve"] = _curve_md(result.get("curve") or [])
    metadata["best_step"] = int(result.get("best_step") or 0)
    if result.get("best_val_lambda_harmonic") is not None:
        metadata["best_val_lambda_harmonic"] = float(result["best_val_lambda_harmonic"])
    metadata["stopped_early"] = bool(result.get("stopped_early"))
    for which, scores in (result.get("heldout") or {}).items():
        for key in ("clip_i", "clip_t", "lambda_harmonic"):
            if isinstance(scores.get(key), (int, float)):
                metadata[f"heldout_{key}_{which}"] = float(scores[key])
    metadata["subject_images"] = len(paths)
    return dg.MaterializeResult(metadata=metadata, data_version=launched.data_version)
