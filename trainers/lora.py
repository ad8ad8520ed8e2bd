"""LoRA adapters for the trainers: peft adapters on the denoiser's attention projections, saved in diffusers' LoRA
format (``pytorch_lora_weights.safetensors`` with the peft config as safetensors metadata, or the family's own
pipeline format), so ``pipe.load_lora_weights(dir)`` loads them anywhere diffusers runs; extra trainable modules
saved beside them (:func:`save_module`).

The frozen reference model is the same denoiser with the trainable adapter switched off (:func:`reference_mode`):
the base model, or — when the run was initialised from an adapter — a frozen copy of that adapter.

torch, diffusers, peft and safetensors are imported inside functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines.io import replace_dir

log = logging.getLogger("prefmill.trainers")

from trainers.families.base import LORA_WEIGHT_NAME  # noqa: E402  (diffusers' file name; one home)
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TRAIN_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"


def lora_config(rank: int, alpha: float | None = None, target_modules: Sequence[str] = LORA_TARGET_MODULES,
                init: str | bool = "gaussian"):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                      target_modules=list(target_modules), init_lora_weights=init)


def add_lora(unet, rank: int, alpha: float | None = None, target_modules: Sequence[str] = LORA_TARGET_MODULES,
             adapter_name: str = TRAIN_ADAPTER, init: str | bool = "gaussian") -> None:
    """Add a peft LoRA adapter to ``unet`` (``unet.add_adapter``); only its parameters stay trainable."""
    import warnings

    with warnings.catch_warnings():  # a second adapter (the frozen reference) is intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(lora_config(rank, alpha, target_modules, init), adapter_name=adapter_name)
    unet.set_adapter(adapter_name)


def lora_parameters(unet, adapter_name: str = TRAIN_ADAPTER) -> list:
    """The trainable LoRA parameters of ``adapter_name``."""
    params = [p for n, p in unet.named_parameters() if ".lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict_diffusers(unet, adapter_name: str = TRAIN_ADAPTER) -> dict:
    """The adapter's weights in diffusers' key format (``...to_q.lora.down.weight``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous() for k, v in convert_state_dict_to_diffusers(sd).items()}


def save_lora(unet, out_dir: str | os.PathLike, adapter_name: str = TRAIN_ADAPTER,
              modules: dict[str, Any] | None = None, family: Any = None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` atomically (built in a sibling dir, then renamed).

    The peft ``LoraConfig`` goes into the safetensors metadata (diffusers' ``unet_lora_adapter_metadata``), so
    ``load_lora_weights`` restores rank *and* alpha exactly. ``modules`` (name -> ``nn.Module``): extra trainable
    modules saved beside it as ``<name>.safetensors`` (+ ``<name>.json``), see :func:`save_module`.
    """
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if family is not None:  # through the family's own pipeline class (transformer_lora_layers, ...)
        family.save_lora(tmp, adapter_name)
    else:
        metadata = unet.peft_config[adapter_name].to_dict()
        metadata = json.loads(json.dumps(metadata, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=lora_state_dict_diffusers(unet, adapter_name),
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
    for name, module in (modules or {}).items():
        save_module(module, tmp, name)
    replace_dir(tmp, out_dir)
    return out_dir


def read_lora(adapter_dir: str | os.PathLike, family: Any = None) -> tuple[dict, dict | None]:
    """``(unet state dict in peft keys, LoraConfig dict or None)`` from a diffusers-format LoRA directory/file
    (``family``: read the family's denoiser keys, e.g. ``transformer.``, instead of the UNet's)."""
    if family is not None:
        return family.read_lora(adapter_dir)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    path = Path(adapter_dir)
    file = path if path.is_file() else path / LORA_WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {file}")
    sd, _alphas = StableDiffusionPipeline.lora_state_dict(str(file.parent), weight_name=file.name)
    unet_sd = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    if not unet_sd:
        raise ValueError(f"{file} holds no UNet LoRA weights")
    unet_sd = convert_unet_state_dict_to_peft(unet_sd)
    config = None
    with safe_open(str(file), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("lora_adapter_metadata")
    if raw:
        packed = json.loads(raw)
        config = {k[len("unet."):]: v for k, v in packed.items() if k.startswith("unet.")} or None
    return unet_sd, config


def adapter_rank_alpha(adapter_dir: str | os.PathLike, family: Any = None) -> tuple[int, float, list[str] | None]:
    """Rank, alpha and target modules of a saved adapter (alpha = rank when the file carries no metadata)."""
    sd, cfg = read_lora(adapter_dir, family)
    rank = next(v.shape[0] for k, v in sd.items() if "lora_A" in k)
    if cfg:
        targets = cfg.get("target_modules")
        return int(cfg.get("r", rank)), float(cfg.get("lora_alpha", rank)), (list(targets) if targets else None)
    return int(rank), float(rank), None


def load_lora_into(unet, adapter_dir: str | os.PathLike, adapter_name: str = TRAIN_ADAPTER,
                   family: Any = None) -> None:
    """Copy a saved adapter's weights into the existing peft adapter ``adapter_name`` of ``unet`` (strict)."""
    from peft.utils import set_peft_model_state_dict

    sd, _ = read_lora(adapter_dir, family)
    result = set_peft_model_state_dict(unet, sd, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k and f".{adapter_name}." in k]
    if unexpected or missing:
        raise ValueError(f"adapter {adapter_dir} does not match the UNet's LoRA layout: "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}), {len(missing)} missing "
                         f"(e.g. {missing[:2]})")


def save_module(module, directory: str | os.PathLike, name: str) -> Path:
    """``directory/<name>.safetensors``: the module's ``state_dict`` (safetensors, never pickle), plus
    ``directory/<name>.json`` with ``module.config_dict()`` when the module has one (what rebuilds it)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / f"{name}.safetensors"), metadata={"format": "pt"})
    config = getattr(module, "config_dict", None)
    if callable(config):
        from trainers.common import write_json

        write_json(directory / f"{name}.json", config())
    return directory / f"{name}.safetensors"


def load_module_into(module, directory: str | os.PathLike, name: str) -> None:
    """Copy ``directory/<name>.safetensors`` into ``module`` (strict: same keys and shapes)."""
    from safetensors.torch import load_file

    path = Path(directory) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no {name} weights at {path}")
    module.load_state_dict(load_file(str(path)), strict=True)


def lora_targets(cfg: Any, family: Any) -> list[str]:
    """The modules a run's adapter wraps: the config's ``lora_target_modules``, else the family's."""
    return list(getattr(cfg, "lora_target_modules", None) or family.lora_target_modules)


def check_lora_targets(model, target_modules: Sequence[str]) -> None:
    """Refuse target names that match no module of ``model`` (peft's rule: the full name or its dotted suffix),
    naming them and the model's linear layers, before anything trains."""
    import torch

    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        import re

        # what a user would type: the name inside its block ("ff.net.0.proj", "attn.to_q"), block path dropped
        linear = sorted({re.sub(r"^.*(?:blocks|layers)\.\d+\.", "", n) for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"lora_target_modules {unmatched} match no module of {type(model).__name__}; its linear "
                         f"layers, inside their blocks: {linear[:40]}")


def setup_lora(unet, rank: int, alpha: float | None, init_adapter: str | None, seed: int,
               target_modules: Sequence[str] = LORA_TARGET_MODULES, family: Any = None) -> dict[str, Any]:
    """Add the trainable adapter; with ``init_adapter`` its rank/alpha/targets and weights come from that adapter and
    a frozen copy of it becomes the ``reference`` adapter (the reference model = the initial policy).

    Returns a description ``{"rank", "alpha", "init_adapter", "reference"}`` for logs/results.
    """
    import torch

    torch.manual_seed(seed)  # gaussian LoRA init is drawn from the global RNG
    reference = "base"
    if init_adapter:
        r, a, targets = adapter_rank_alpha(init_adapter, family)
        if (r, a) != (rank, alpha if alpha is not None else rank):
            log.info("init adapter %s has rank %s alpha %s: using them (config asked rank %s)",
                     init_adapter, r, a, rank)
        rank, alpha = r, a
        target_modules = targets or target_modules
        check_lora_targets(unet, target_modules)
        add_lora(unet, rank, alpha, target_modules, adapter_name=REFERENCE_ADAPTER)
        load_lora_into(unet, init_adapter, REFERENCE_ADAPTER, family)
        add_lora(unet, rank, alpha, target_modules, adapter_name=TRAIN_ADAPTER)
        load_lora_into(unet, init_adapter, TRAIN_ADAPTER, family)
        reference = "init_adapter"
    else:
        check_lora_targets(unet, target_modules)
        add_lora(unet, rank, alpha, target_modules, adapter_name=TRAIN_ADAPTER)
    unet.set_adapter(TRAIN_ADAPTER)
    for n, p in unet.named_parameters():
        p.requires_grad_(".lora_" in n and f".{TRAIN_ADAPTER}." in n)
    return {"rank": int(rank), "alpha": float(alpha if alpha is not None else rank),
            "init_adapter": init_adapter, "reference": reference}


def has_reference_adapter(unet) -> bool:
    return REFERENCE_ADAPTER in (getattr(unet, "peft_config", None) or {})


@contextlib.contextmanager
def reference_mode(unet) -> Iterator[None]:
    """Run the frozen reference inside this block: the ``reference`` adapter when the run was initialised from an
    adapter, else the base UNet (``disable_adapters()``). Restores the trainable adapter (and its
    ``requires_grad``) on exit. Use under ``torch.no_grad()``."""
    if has_reference_adapter(unet):
        unet.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            unet.set_adapter(TRAIN_ADAPTER)
            _train_only(unet)
    else:
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
            _train_only(unet)


def _train_only(unet) -> None:
    for n, p in unet.named_parameters():
        if ".lora_" in n:
            p.requires_grad_(f".{TRAIN_ADAPTER}." in n)
