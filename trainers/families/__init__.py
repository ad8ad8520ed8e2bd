"""Model families: one module per family behind :class:`trainers.families.base.ModelFamily`.

The family is read from the checkpoint — ``model_index.json``'s ``_class_name`` (the diffusers pipeline class) —
never from a setting the user must keep in sync::

    family = load_family("zoo:qwen_image_edit")      # or a local directory, or a hub id the user names
    family.check_task("multi_ref")                    # refuses tasks the checkpoint cannot condition on

| family       | pipeline classes                                                       | objective        |
|--------------|------------------------------------------------------------------------|------------------|
| ``sd``       | StableDiffusionPipeline, StableDiffusionInstructPix2PixPipeline         | ε / v, DDIM      |
| ``sdxl``     | StableDiffusionXLPipeline                                               | ε / v, DDIM      |
| ``sd3``      | StableDiffusion3Pipeline                                                | flow matching    |
| ``flux``     | FluxPipeline, FluxKontextPipeline                                       | flow matching    |
| ``qwen_image`` | QwenImagePipeline, QwenImageEditPlusPipeline, QwenImageEditPipeline   | flow matching    |
| ``janus``    | JanusForConditionalGeneration (transformers; ``config.json`` architectures) | AR VQ tokens |

``janus`` is the autoregressive family (:mod:`trainers.families.janus`): a transformers checkpoint with no
``model_index.json``, detected from ``config.json``; it implements what generation and ``trainers.ar_grpo`` need,
not the denoiser interface of :class:`ModelFamily`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from trainers.families.base import TASKS, Conditioning, ModelFamily, Schedule, UnsupportedTaskError

_MODULES = {
    "sd": "trainers.families.sd:SDFamily",
    "sdxl": "trainers.families.sdxl:SDXLFamily",
    "sd3": "trainers.families.sd3:SD3Family",
    "flux": "trainers.families.flux:FluxFamily",
    "qwen_image": "trainers.families.qwen_image:QwenImageFamily",
}
# autoregressive families (transformers checkpoints, detected from config.json's architectures)
_AR_MODULES = {"janus": "trainers.families.janus:JanusFamily"}
AR_ARCHITECTURES = {"JanusForConditionalGeneration": "janus"}
# pipeline class -> family name (kept here, not imported, so detection needs no torch)
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionInstructPix2PixPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxKontextPipeline": "flux",
    "QwenImagePipeline": "qwen_image",
    "QwenImageEditPlusPipeline": "qwen_image",
    "QwenImageEditPipeline": "qwen_image",
}
# how many input images each pipeline class conditions on (0: text only; 1: one source image, several references
# reach it as a grid; N: several natively) -- known without loading the model
PIPELINE_INPUT_IMAGES = {
    "StableDiffusionInstructPix2PixPipeline": 1,
    "FluxKontextPipeline": 4,
    "QwenImageEditPipeline": 1,
    "QwenImageEditPlusPipeline": 8,
}
FAMILIES = tuple(_MODULES)
FLOW_FAMILIES = ("sd3", "flux", "qwen_image")
AR_FAMILIES = tuple(_AR_MODULES)


def family_class(name: str) -> type[ModelFamily]:
    modules = {**_MODULES, **_AR_MODULES}
    if name not in modules:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES + AR_FAMILIES)}")
    module, cls = modules[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_path(ref: str) -> str:
    """``zoo:<name>`` -> the zoo directory; local paths and hub ids pass through."""
    if isinstance(ref, str) and ref.startswith("zoo:"):
        from pipelines.zoo import resolve_model

        return resolve_model(ref)
    return str(ref)


def _ar_architecture(config: Path) -> str | None:
    archs = json.loads(config.read_text()).get("architectures") or []
    return next((a for a in archs if a in AR_ARCHITECTURES), None)


def pipeline_class_name(ref: str) -> str:
    """The ``_class_name`` in the checkpoint's ``model_index.json``, or for a transformers checkpoint of an
    autoregressive family the architecture in its ``config.json`` (a hub id is only fetched when named)."""
    path = Path(resolve_path(ref))
    index = path / "model_index.json"
    if not index.is_file():
        if (path / "config.json").is_file() and _ar_architecture(path / "config.json"):
            return str(_ar_architecture(path / "config.json"))
        if path.exists() or str(ref).startswith((".", "/", "~")):
            raise FileNotFoundError(f"{ref}: no model_index.json (not a diffusers pipeline directory)")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            index = Path(hf_hub_download(str(ref), "model_index.json"))
        except EntryNotFoundError:
            arch = _ar_architecture(Path(hf_hub_download(str(ref), "config.json")))
            if arch is None:
                raise
            return arch
    name = json.loads(index.read_text()).get("_class_name")
    if not isinstance(name, str):
        raise ValueError(f"{index}: no _class_name")
    return name


def detect_family(ref: str) -> str:
    """The family name of a checkpoint, from its pipeline class."""
    cls = pipeline_class_name(ref)
    if cls in AR_ARCHITECTURES:
        return AR_ARCHITECTURES[cls]
    if cls not in PIPELINE_FAMILIES:
        raise ValueError(f"{ref}: pipeline class {cls} belongs to no supported family; supported classes: "
                         f"{', '.join(sorted(PIPELINE_FAMILIES))}")
    return PIPELINE_FAMILIES[cls]


def input_images(ref: str) -> int:
    """How many input images the checkpoint's pipeline class conditions on (read from ``model_index.json``)."""
    return PIPELINE_INPUT_IMAGES.get(pipeline_class_name(ref), 0)


def load_family(ref: str, device: Any = None, dtype: Any = None, freeze: bool = True) -> ModelFamily:
    """Load a checkpoint through its own diffusers pipeline class and wrap it in its family."""
    import contextlib
    import warnings

    import diffusers

    path = resolve_path(ref)
    name = detect_family(ref)
    if name in AR_FAMILIES:  # a transformers checkpoint, loaded through its own from_pretrained
        return family_class(name).from_pretrained(path, device=device, dtype=dtype, freeze=freeze)
    cls_name = pipeline_class_name(ref)
    diffusers.utils.logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if name == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
        pipe = getattr(diffusers, cls_name).from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    family = family_class(name)(pipe, path)
    if freeze:
        family.freeze()
    if device is not None:
        family.to(device)
    return family


__all__ = ["AR_FAMILIES", "FAMILIES", "FLOW_FAMILIES", "PIPELINE_FAMILIES", "TASKS", "Conditioning", "ModelFamily", "Schedule",
           "UnsupportedTaskError", "detect_family", "family_class", "input_images", "load_family", "pipeline_class_name",
           "resolve_path"]
