"""Dagster resources that own the models. Each loads its models lazily, once per step process, and frees them
at teardown; nothing heavy is imported when this module loads."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from pipelines.paths import CORPORA_ENV, Layout, default_data_root, default_inbox
from pipelines.profiles import DEFAULT_PROFILE, PROFILE_ENV, load_profile


def _profile_field() -> Any:
    return dg.EnvVar(PROFILE_ENV).get_value(DEFAULT_PROFILE)


class StorageResource(dg.ConfigurableResource):
    """Where every asset writes: one folder per asset under ``root`` (``PREFMILL_DATA``, default ``./data``)."""

    root: str
    inbox: str = ""  # where prompt batch files arrive; default PREFMILL_INBOX or <root>/inbox
    # Where the versioned corpora live: any fsspec URL (``s3://bucket/prefix`` with s3fs installed; credentials
    # from the usual AWS_* environment, never from config). Default PREFMILL_CORPORA or <root>/corpora.
    corpora: str = ""

    def corpus_root(self, corpus: str) -> str:
        import os

        base = self.corpora or os.environ.get(CORPORA_ENV, "")
        return f"{base.rstrip('/')}/{corpus}" if base else str(self.layout.corpus_root(corpus))

    @property
    def inbox_dir(self) -> str:
        return self.inbox or default_inbox(self.root)

    @property
    def layout(self) -> Layout:
        return Layout(self.root)


class ProfileResource(dg.ConfigurableResource):
    """The model and batch settings of this setup: a profile name (``pipelines/profiles/<name>.yaml``) or path."""

    name: str = DEFAULT_PROFILE

    def settings(self) -> dict[str, Any]:
        return load_profile(self.name)


class GeneratorResource(dg.ConfigurableResource):
    """Diffusers pipelines per task, from the profile's ``generation.generators``."""

    profile: ProfileResource
    device: str | None = None  # overrides the profile's device (e.g. "cuda:1")
    _generators: dict[str, Any] = PrivateAttr(default_factory=dict)

    def generator_spec(self, task: str) -> dict[str, Any]:
        settings = self.profile.settings()
        spec = dict(settings["generation"]["generators"][task])
        spec.setdefault("device", self.device or settings.get("device", "cpu"))
        spec.setdefault("dtype", settings.get("dtype", "float32"))
        spec.setdefault("batch_size", settings["generation"].get("batch_size", 8))
        if settings.get("cpu_threads"):
            spec.setdefault("cpu_threads", settings["cpu_threads"])
        return spec

    def for_task(self, task: str):
        """The ``ImageGenerator`` for a task; tasks that share a model and sampling settings share one pipeline."""
        from pipelines.generation import ImageGenerator

        spec = self.generator_spec(task)
        spec.pop("reference_grid", None)  # obsolete: a single-image edit model always gets the grid
        if task == "multi_ref":
            spec["reference_input"] = multi_ref_input(spec["model"])
        cache_key = repr(sorted(spec.items()))
        if cache_key not in self._generators:
            self._generators[cache_key] = ImageGenerator(**spec)
        return self._generators[cache_key]

    def for_model(self, model: str):
        """An ``ImageGenerator`` for ``model`` (e.g. the checkpoint the trainers fine-tuned, for the evals) with the
        sampling settings of the task generator that uses it (the t2i generator's otherwise); it takes the input
        images its pipeline class takes."""
        from pipelines.generation import ImageGenerator
        from pipelines.zoo import resolve_model
        from trainers.families import input_images

        spec = next((self.generator_spec(t) for t in ("multi_ref", "edit", "t2i")
                     if self.generator_spec(t)["model"] == model), None) or {**self.generator_spec("t2i"),
                                                                             "model": model}
        spec.pop("reference_grid", None)
        n = input_images(resolve_model(model))
        spec["kind"] = "edit" if n else "t2i"
        spec["reference_input"] = "native" if n > 1 else ("grid" if n == 1 else None)
        if n == 0:
            spec.pop("image_guidance_scale", None)
        cache_key = repr(sorted(spec.items()))
        if cache_key not in self._generators:
            self._generators[cache_key] = ImageGenerator(**spec)
        return self._generators[cache_key]

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for generator in self._generators.values():
            generator.teardown()
        self._generators.clear()


JUDGE_API_KEY_ENV = "PREFMILL_JUDGE_API_KEY"


class JudgeResource(dg.ConfigurableResource):
    """The VLM judge backend named by the profile: ``transformers`` locally, ``vllm`` on GPU nodes, ``openai`` for
    an OpenAI-compatible endpoint (a vLLM server or a hosted model), ``verifier`` for the proving ground's fact
    checker (no model; :mod:`labelers.verifier`). The endpoint's key comes from the environment
    (``PREFMILL_JUDGE_API_KEY`` through ``dagster.EnvVar``): it is never in a profile, a log or run config."""

    profile: ProfileResource
    device: str | None = None
    api_key: str | None = None
    _judge: Any = PrivateAttr(default=None)

    def judge(self):
        """The profile's judge, built by ``pipelines.stages.judge_from_profile`` and set up once."""
        if self._judge is None:
            from pipelines.stages import judge_from_profile

            self._judge = judge_from_profile(self.profile.settings(), device=self.device, api_key=self.api_key)
            self._judge.setup()
        return self._judge

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._judge = None


class ClipResource(dg.ConfigurableResource):
    """The CLIP scorer (open_clip or transformers CLIP) named by the profile."""

    profile: ProfileResource
    device: str | None = None
    _scorer: Any = PrivateAttr(default=None)
    _preference: Any = PrivateAttr(default=None)

    def preference_scorer(self):
        """The profile's optional preference scorer (``clip.preference_model``, a PickScore/HPS-style CLIP), or None."""
        settings = self.profile.settings()
        spec = settings["clip"]
        if not spec.get("preference_model"):
            return None
        if self._preference is None:
            from labelers.clip_scorer import ClipScorer

            self._preference = ClipScorer(model=spec["preference_model"],
                                          backend=spec.get("preference_backend", "transformers"),
                                          device=self.device or settings.get("device", "cpu"),
                                          batch_size=spec.get("batch_size", 32), cpu_threads=settings.get("cpu_threads"))
            self._preference.setup()
        return self._preference

    def scorer(self):
        if self._scorer is None:
            from labelers.clip_scorer import ClipScorer

            settings = self.profile.settings()
            spec = settings["clip"]
            self._scorer = ClipScorer(model=spec["model"], backend=spec.get("backend", "open_clip"),
                                      device=self.device or settings.get("device", "cpu"),
                                      batch_size=spec.get("batch_size", 32),
                                      cpu_threads=settings.get("cpu_threads"))
            self._scorer.setup()
        return self._scorer

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._scorer = None
        self._preference = None


def multi_ref_input(model: str) -> str:
    """"native" for models that take several input images, "grid" for single-image edit models; a text-only model
    cannot condition on references and is refused (never generated as text-to-image)."""
    from pipelines.zoo import resolve_model
    from trainers.families import input_images, pipeline_class_name

    path = resolve_model(model)
    n = input_images(path)
    if n == 0:
        raise ValueError(f"task 'multi_ref' needs a model that takes input images, but {model} "
                         f"({pipeline_class_name(path)}) conditions on text only")
    return "native" if n > 1 else "grid"


def default_resources(data_root: str | None = None, profile: str | None = None) -> dict[str, Any]:
    profile_resource = ProfileResource(name=profile or _profile_field())
    return {
        "storage": StorageResource(root=data_root or default_data_root()),
        "profile": profile_resource,
        "generator": GeneratorResource(profile=profile_resource),
        # EnvVar keeps the key out of the run config and the UI; only set when the environment has one.
        "judge": JudgeResource(profile=profile_resource,
                               api_key=dg.EnvVar(JUDGE_API_KEY_ENV) if os.environ.get(JUDGE_API_KEY_ENV) else None),
        "clip": ClipResource(profile=profile_resource),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
