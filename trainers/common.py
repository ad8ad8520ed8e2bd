"""Plumbing shared by the trainers: configs, pipelines, latents, metrics (+ Dagster Pipes), checkpoints.

- Configs are dataclasses read from JSON or YAML (``--config FILE``) by :mod:`trainers.config_io` (imported here);
  unknown keys are rejected.
- Pipelines load with ``StableDiffusionPipeline.from_pretrained`` from a directory (``zoo:<name>`` references are
  resolved through ``pipelines.zoo.resolve_model``; a hub id only downloads when the user names one).
- LoRA adapters and the frozen reference model live in :mod:`trainers.lora` (imported here, so trainers reach
  them as ``common.save_lora``, ``common.reference_mode``, ...).
- :class:`MetricsLogger` writes ``metrics.jsonl`` (one line per step) and, when the process runs under Dagster
  Pipes, streams each line as a log message and reports the final asset materialization.
- :class:`CheckpointManager`: ``<output_dir>/checkpoints/step-XXXXXXXX/`` = adapter + optimizer state
  (``torch.save`` of tensors/primitives, loaded with ``weights_only=True``) + ``trainer_state.json``; written
  atomically; a restart with the same config resumes from the latest one.

Heavy libraries (torch, diffusers, peft, accelerate) are imported inside functions; only the trainer process
imports them. Never imports dagster (``dagster_pipes`` is the separate lightweight package).

One module of ~520 lines (configs and LoRA live apart): :func:`prepare_training` and :func:`finish_training` wire the
pipeline, the metrics logger and the checkpoint manager together, so those stay beside the skeleton that uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from labelers import torch_compat as _torch_compat
from pipelines.io import atomic_write_text, remove_stale_temps, replace_dir
from trainers.config_io import (  # noqa: F401 - reached as ``common.<name>`` by trainers and their __main__
    RESUME_NEUTRAL_FIELDS,
    cli_main,
    coerce_config,
    config_fingerprint,
    config_from_dict,
    config_to_dict,
)
from trainers.lora import (  # noqa: F401 - the LoRA helpers trainers reach as ``common.<name>``
    LORA_WEIGHT_NAME,
    TRAIN_ADAPTER,
    load_lora_into,
    load_module_into,
    lora_parameters,
    lora_targets,
    reference_mode,
    save_lora,
    save_module,
    setup_lora,
)

# Also done by ``trainers/__init__``; repeated here because a stale editable install can resolve ``trainers`` as a
# namespace package (``__init__`` not run) when the process does not start in the repo root.
_torch_compat.install()

log = logging.getLogger("prefmill.trainers")

CHECKPOINTS_DIR = "checkpoints"


# ============================================================================================ misc
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, salt: int = 0, device: str = "cpu"):
    """A ``torch.Generator`` seeded from ``(seed, step, salt)``: the randomness of step ``k`` does not depend on
    what ran before it, so a resumed run draws exactly what an uninterrupted run would have."""
    import torch

    digest = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (tensors and numpy scalars as numbers), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def to_float(value: Any) -> float:
    return float(value.detach().float().mean().item()) if hasattr(value, "detach") else float(value)


def make_accelerator(mixed_precision: str = "no", device: str | None = None):
    """An ``accelerate.Accelerator`` (CPU when no accelerator is present or ``device == "cpu"``)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, cpu=(device == "cpu"))


# ============================================================================================ pipelines
def load_pipeline(model: str, device=None, dtype=None):
    """``StableDiffusionPipeline.from_pretrained(dir)`` with every component frozen and in eval mode."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    from pipelines.zoo import resolve_model

    path = resolve_model(model)
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    if device is not None:
        pipe.to(device)
    return pipe


# ============================================================================================ encoding
def condition_batch(family, texts: Sequence[str], metas: Sequence[dict[str, Any]], size: int):
    """Encode a batch of corpus samples under ``family``: each sample's text plus the images its task conditions on
    (``src.jpg`` for edits, ``ref_K.jpg`` for multi_ref, read from the sample's meta by ``trainers.data``).
    A task the family cannot condition on raises :class:`trainers.families.UnsupportedTaskError`."""
    from trainers.data import condition_images

    images = []
    for meta in metas:
        task = str((meta or {}).get("task") or "t2i")
        src, refs = condition_images(meta or {})
        images.append(family.condition_images(task, src, refs, size))
    return family.encode(list(texts), images if any(images) else None, size)


def encode_prompts(pipe, texts: Sequence[str], device=None):
    """CLIP text embeddings ``(B, 77, D)`` as SD conditions on (last hidden state, padded to max length)."""
    import torch

    device = device or pipe.text_encoder.device
    tok = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids.to(device))[0]


def _vae_factors(vae) -> tuple[float, float]:
    cfg = vae.config
    return float(getattr(cfg, "scaling_factor", 1.0) or 1.0), float(getattr(cfg, "shift_factor", None) or 0.0)


def images_to_latents(vae, pixels, generator=None, sample: bool = True):
    """``(B,3,H,W)`` in ``[-1,1]`` -> scaled latents ``(z - shift)·scale`` (sampled from the posterior)."""
    import torch

    scale, shift = _vae_factors(vae)
    with torch.no_grad():
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
    return (z - shift) * scale


def latents_to_images(vae, latents):
    """Scaled latents -> pixels ``(B,3,H,W)`` in ``[-1,1]``."""
    scale, shift = _vae_factors(vae)
    return vae.decode(latents.to(vae.dtype) / scale + shift).sample.clamp(-1, 1)


def tensor_to_pil(pixels) -> list:
    """``(B,3,H,W)`` in ``[-1,1]`` -> list of PIL RGB."""
    from PIL import Image

    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


# ============================================================================================ metrics + pipes
def _pipes_active() -> bool:
    try:
        from dagster_pipes import PipesEnvVarParamsLoader
    except ImportError:  # pragma: no cover - dagster-pipes is a core dependency
        return False
    return PipesEnvVarParamsLoader().is_dagster_pipes_process()


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """``metrics.jsonl`` (one JSON object per step: ``{"step": k, ...}``) + Dagster Pipes forwarding.

    On resume from step ``k`` lines with ``step > k`` (written after the last checkpoint) are dropped, so the
    file keeps exactly one line per step. Under Pipes each line is also sent with ``pipes.log.info`` and
    :meth:`finish` reports the asset materialization (final metrics, adapter path, loss curve).
    """

    def __init__(self, output_dir: str | os.PathLike, resume_step: int = 0, enabled: bool = True,
                 loss_key: str = "loss"):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.loss_key = loss_key
        self.history: list[dict[str, Any]] = []
        self.pipes = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if int(rec.get("step", 0)) <= resume_step:
                    kept.append(json.dumps(rec))
                    self.history.append(rec)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._fh = open(self.path, "a")
        if _pipes_active():
            from dagster_pipes import open_dagster_pipes

            self.pipes = open_dagster_pipes()
            self.pipes.log.info(f"trainer started; metrics -> {self.path}; resuming after step {resume_step}")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        values = {k: _finite(to_float(v) if hasattr(v, "detach") else v) for k, v in metrics.items()}
        rec = {"step": int(step), **values}
        rec.setdefault("time", round(time.time(), 3))
        self.history.append(rec)
        if not self.enabled:
            return rec
        line = json.dumps(rec, default=_json_default)
        self._fh.write(line + "\n")
        self._fh.flush()
        log.info("step %s %s", step, line)
        if self.pipes is not None:
            self.pipes.log.info(line)
        return rec

    def info(self, message: str) -> None:
        log.info(message)
        if self.pipes is not None:
            self.pipes.log.info(message)

    def loss_curve(self, max_points: int = 500) -> list[float]:
        values = [r[self.loss_key] for r in self.history if isinstance(r.get(self.loss_key), (int, float))]
        if len(values) > max_points:  # keep the shape: evenly spaced samples, last point included
            idx = [round(i * (len(values) - 1) / (max_points - 1)) for i in range(max_points)]
            values = [values[i] for i in idx]
        return [float(v) for v in values]

    def finish(self, result: dict[str, Any]) -> None:
        """Close the file; under Pipes report the materialization with the final metrics and paths."""
        if not self.enabled:
            return
        self._fh.close()
        if self.pipes is None:
            return
        metadata: dict[str, Any] = {}
        for k, v in (result.get("final_metrics") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                metadata[f"final/{k}"] = float(v)
        metadata["steps"] = int(result.get("steps", 0))
        for key in ("adapter_path", "best_adapter_path", "checkpoint_path"):
            if result.get(key):
                metadata[key] = {"raw_value": str(result[key]), "type": "path"}
        metadata["metrics_path"] = {"raw_value": str(self.path), "type": "path"}
        metadata["loss_curve"] = {"raw_value": self.loss_curve(), "type": "json"}
        if result.get("config"):
            metadata["config"] = {"raw_value": result["config"], "type": "json"}
        try:
            self.pipes.report_asset_materialization(metadata=metadata)
        finally:
            self.pipes.close()
            self.pipes = None


# ============================================================================================ checkpoints
class CheckpointManager:
    """Checkpoints under ``<output_dir>/checkpoints/step-XXXXXXXX/``:

    - ``adapter/pytorch_lora_weights.safetensors`` — the trainable LoRA (diffusers format), and
      ``adapter/<name>.safetensors`` (+ ``.json``) for each extra trainable module (``modules``);
    - ``optimizer.pt`` — ``optimizer.state_dict()`` (tensors + primitives only; loaded with ``weights_only=True``);
    - ``trainer_state.json`` — ``{"step", "config_fingerprint", "config", "extra"}`` (``extra``: the trainer's own
      counters, e.g. samples consumed or the best held-out score), written last: a directory without it is
      incomplete and ignored.
    """

    def __init__(self, output_dir: str | os.PathLike, every: int, keep: int = 2,
                 modules: dict[str, Any] | None = None, family: Any = None):
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.every = int(every)
        self.keep = int(keep)
        self.modules = dict(modules or {})  # name -> unwrapped nn.Module, saved and restored with the adapter
        self.family = family  # the model family: adapters are saved in its pipeline's LoRA format

    def due(self, step: int, final_step: int) -> bool:
        return step == final_step or (self.every > 0 and step % self.every == 0)

    def all(self) -> list[tuple[int, Path]]:
        out = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and d.name.startswith("step-") and (d / "trainer_state.json").is_file():
                    with contextlib.suppress(ValueError):
                        out.append((int(d.name[len("step-"):]), d))
        return sorted(out)

    def latest(self) -> tuple[int, Path] | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, unet, optimizer, config: Any, extra: dict[str, Any] | None = None) -> Path:
        import torch

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_lora(unet, tmp / "adapter", modules=self.modules, family=self.family)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        fingerprint, _ = config_fingerprint(config)
        state = {"step": int(step), "config_fingerprint": fingerprint, "config": config_to_dict(config),
                 "extra": extra or {}, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(tmp / "trainer_state.json", state)
        replace_dir(tmp, final)
        for old_step, old_dir in self.all()[: -self.keep] if self.keep > 0 else []:
            if old_step != step:
                shutil.rmtree(old_dir, ignore_errors=True)
        return final

    def load(self, ckpt_dir: Path, unet, optimizer, config: Any) -> dict[str, Any]:
        """Restore adapter + optimizer from ``ckpt_dir``; refuses a checkpoint written under a different config."""
        import torch

        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        fingerprint, data = config_fingerprint(config)
        if state.get("config_fingerprint") != fingerprint:
            old = {k: v for k, v in (state.get("config") or {}).items() if k not in RESUME_NEUTRAL_FIELDS}
            diff = sorted(k for k in set(old) | set(data) if old.get(k) != data.get(k))
            raise ValueError(
                f"checkpoint {ckpt_dir} was written with a different config (fields: {', '.join(diff)}); "
                "use a new output_dir or set resume: false to start over")
        load_lora_into(unet, ckpt_dir / "adapter", TRAIN_ADAPTER, self.family)
        for name, module in self.modules.items():
            load_module_into(module, ckpt_dir / "adapter", name)
        opt_state = torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt_state)
        return state

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def start(self, resume: bool, unet, optimizer, config: Any) -> tuple[int, dict[str, Any], Path | None]:
        """Where a run starts: with ``resume`` off the checkpoints are cleared and it starts at step 0; otherwise the
        latest checkpoint (if any) is loaded. Returns ``(start_step, extra, the loaded checkpoint or None)``."""
        if not resume:
            self.clear()
            return 0, {}, None
        latest = self.latest()
        if latest is None:
            return 0, {}, None
        state = self.load(latest[1], unet, optimizer, config)
        return int(state["step"]), dict(state.get("extra") or {}), latest[1]


def remove_stale_training_temps(output_dir: str | os.PathLike, started_at: float | None = None) -> list[Path]:
    """Remove what a killed trainer left in ``output_dir`` and its ``checkpoints/``: half-built checkpoints
    (``.step-XXXXXXXX.tmp-<pid>``), adapters (``.adapter.tmp-<pid>``), moved-aside old copies
    (``.old-<pid>@<host>``) and file temps (``.config.json.tmp-<pid>@<host>.*.tmp``, :func:`pipelines.io.atomic_path`)
    — only those whose process is gone and that have not changed since
    ``started_at`` (default: now), so a live trainer's temps are never touched
    (:func:`pipelines.io.remove_stale_temps`)."""
    out = Path(output_dir)
    return remove_stale_temps(out, started_at) + remove_stale_temps(out / CHECKPOINTS_DIR, started_at)


# ============================================================================================ training skeleton
@dataclasses.dataclass
class TrainingSetup:
    """What every trainer builds before its loop (see :func:`prepare_training`)."""

    config: Any
    accelerator: Any
    pipe: Any
    unet: Any
    optimizer: Any
    params: list
    logger: MetricsLogger
    checkpoints: CheckpointManager
    start_step: int
    extra: dict[str, Any]
    lora: dict[str, Any]
    output_dir: Path
    modules: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra trainable modules (prepared)
    family: Any = None  # the trainers.families.ModelFamily wrapping ``pipe`` (the denoiser is ``unet``)

    @property
    def device(self):
        return self.accelerator.device


def prepare_training(cfg: Any, *, loss_key: str = "loss", modules=None) -> TrainingSetup:
    """Seed, load the pipeline, add LoRA (optionally from ``cfg.init_adapter``), build AdamW, resume.

    ``modules``: extra trainable ``nn.Module``s (name -> module, or a callable ``pipe -> {name: module}`` for
    modules sized from the pipeline), e.g. SFT's reward embedding. Each gets its own AdamW parameter group after
    the LoRA's (so ``params`` and gradient clipping cover them), is saved with every checkpoint and the final
    adapter (:func:`save_module`), restored on resume, and passed through ``accelerator.prepare``
    (``TrainingSetup.modules`` holds the prepared ones).

    Reads these config fields: ``pretrained_model, output_dir, seed, lora_rank, lora_alpha, learning_rate,
    adam_weight_decay, checkpoint_every, keep_checkpoints, resume, mixed_precision, device, num_threads`` and
    ``init_adapter`` when present.
    """
    import torch

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_training_temps(out)
    if getattr(cfg, "num_threads", None):
        torch.set_num_threads(int(cfg.num_threads))
    set_seed(cfg.seed)
    accelerator = make_accelerator(getattr(cfg, "mixed_precision", "no"), getattr(cfg, "device", None))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    from trainers.families import load_family

    # the family comes from the checkpoint's model_index.json (sd, sdxl, sd3, flux, qwen_image)
    family = load_family(cfg.pretrained_model)
    for task in getattr(cfg, "tasks", None) or []:
        family.check_task(task)  # refuse, naming task and family, before anything trains
    pipe = family.pipe
    family.to(accelerator.device, None if weight_dtype == torch.float32 else weight_dtype)
    unet = family.denoiser  # the trained module: a UNet or a transformer (the name is historical)
    lora = setup_lora(unet, cfg.lora_rank, getattr(cfg, "lora_alpha", None), getattr(cfg, "init_adapter", None),
                      cfg.seed, target_modules=lora_targets(cfg, family), family=family)
    lora["family"] = family.name
    lora["pipeline_class"] = family.pipeline_class
    params = lora_parameters(unet)
    extra_modules = dict((modules(family) if callable(modules) else modules) or {})
    groups = [{"params": params}]
    for module in extra_modules.values():
        module.to(accelerator.device)
        groups.append({"params": [p for p in module.parameters() if p.requires_grad]})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=getattr(cfg, "adam_weight_decay", 0.0))

    checkpoints = CheckpointManager(out, cfg.checkpoint_every, getattr(cfg, "keep_checkpoints", 2),
                                    modules=extra_modules, family=family)
    start_step, extra, resumed_from = checkpoints.start(getattr(cfg, "resume", True), unet, optimizer, cfg)
    unet, optimizer, *prepared = accelerator.prepare(unet, optimizer, *extra_modules.values())
    family.set_forward_module(unet)
    logger = MetricsLogger(out, resume_step=start_step, enabled=accelerator.is_main_process, loss_key=loss_key)
    if start_step:
        logger.info(f"resumed from {resumed_from} at step {start_step}")
    write_json(out / "config.json", config_to_dict(cfg))
    return TrainingSetup(cfg, accelerator, pipe, unet, optimizer, params, logger, checkpoints, start_step, extra,
                         lora, out, dict(zip(extra_modules, prepared)), family)


def unwrap(setup: TrainingSetup):
    return setup.accelerator.unwrap_model(setup.unet)


def apply_lr(optimizer, cfg: Any, step: int) -> float:
    """Constant learning rate after a linear warmup of ``cfg.lr_warmup_steps`` (a pure function of the step)."""
    warm = int(getattr(cfg, "lr_warmup_steps", 0) or 0)
    lr = cfg.learning_rate * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def finish_training(setup: TrainingSetup, step: int, final_metrics: dict[str, Any],
                    extra_result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save ``adapter/``, write ``result.json``, report to Pipes; returns the result dict."""
    setup.accelerator.wait_for_everyone()
    if not setup.accelerator.is_main_process:
        return {}
    modules = {name: setup.accelerator.unwrap_model(m) for name, m in setup.modules.items()}
    adapter_dir = save_lora(unwrap(setup), setup.output_dir / "adapter", modules=modules, family=setup.family)
    return write_training_result(setup.output_dir, step, adapter_dir, setup.checkpoints, setup.logger, final_metrics,
                                 setup.lora, setup.family, setup.config, setup.start_step, extra_result)


def write_training_result(output_dir: Path, step: int, adapter_dir: Path, checkpoints: CheckpointManager,
                          logger: MetricsLogger, final_metrics: dict[str, Any], lora: dict[str, Any], family: Any,
                          config: Any, start_step: int,
                          extra_result: dict[str, Any] | None = None) -> dict[str, Any]:
    """``result.json`` of a finished run (the saved adapter, latest checkpoint, final metrics, what it trained and
    from where; ``extra_result`` added), also reported to Pipes through ``logger``; returns it."""
    from pipelines.zoo import resolve_model

    latest = checkpoints.latest()
    result = {
        "steps": int(step),
        "adapter_path": str(adapter_dir),
        "adapter_file": str(adapter_dir / LORA_WEIGHT_NAME),
        "checkpoint_path": str(latest[1]) if latest else None,
        "metrics_path": str(logger.path),
        "final_metrics": {k: _finite(v) for k, v in final_metrics.items()},
        "lora": lora,
        "family": family.name if family is not None else None,
        "pipeline_class": family.pipeline_class if family is not None else None,
        "pretrained_model_path": str(resolve_model(config.pretrained_model)),
        "resumed_from_step": int(start_step),
        "config": config_to_dict(config),
        **(extra_result or {}),
    }
    write_json(output_dir / "result.json", result)
    logger.finish(result)
    return result

