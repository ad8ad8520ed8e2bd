"""The model-family interface that generation and every trainer see (one module per family beside this one).

A family wraps a loaded diffusers pipeline and answers, in the family's own terms:

- which tasks it can condition on (:meth:`ModelFamily.check_task` refuses the others, naming task and family);
- :meth:`encode`: text plus the task's source/reference images -> a :class:`Conditioning`;
- :meth:`images_to_latents` / :meth:`latents_to_images`: pixels <-> the denoiser's latent space (packed token
  sequences for FLUX and Qwen-Image);
- :meth:`training_sample`: the training target and timestep sampling (ε / v for the UNet families, the flow velocity
  ``ε - x0`` with the family's shifted logit-normal σ for the flow-matching transformers);
- :meth:`predict`: one denoiser forward (classifier-free guidance in :meth:`guided_predict`);
- :meth:`schedule` + :meth:`step_mean_std`: the sampler, stochastic with a Gaussian transition whose log-density the
  GRPO trainer evaluates (DDIM-η for diffusion; Flow-SDE / Dance-SDE / CPS / ODE for flow matching);
- LoRA: its target modules and :meth:`save_lora`, written through the pipeline class's own ``save_lora_weights`` so
  that the family's diffusers pipeline loads it with ``load_lora_weights``.

Nothing here imports Dagster; torch and diffusers are imported inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

TASKS = ("t2i", "edit", "multi_ref")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class UnsupportedTaskError(ValueError):
    """A task the family cannot condition on (never silently trained as text-to-image)."""


# ================================================================================================ conditioning
@dataclasses.dataclass
class Conditioning:
    """Encoded conditions of a batch: batch-first tensors plus one hashable *layout* per sample.

    Samples with equal layouts (e.g. the same number and sizes of input images) run in one denoiser forward;
    :meth:`ModelFamily.predict` groups a mixed batch by layout. ``seq_keys`` name tensors whose dim 1 is a variable
    length sequence: :meth:`cat` right-pads them with zeros (attention masks included, so padding is masked out).
    """

    tensors: dict[str, Any]
    layouts: list[Any]
    seq_keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.layouts)

    def take(self, index: Sequence[int] | slice) -> Conditioning:
        import torch

        if isinstance(index, slice):
            index = list(range(len(self)))[index]
        index = list(index)
        idx = torch.as_tensor(index, dtype=torch.long)
        tensors = {k: v.index_select(0, idx.to(v.device)) for k, v in self.tensors.items()}
        return Conditioning(tensors, [self.layouts[i] for i in index], self.seq_keys)

    def repeat(self, times: int) -> Conditioning:
        return Conditioning.cat([self] * int(times))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        import torch

        parts = list(parts)
        seq_keys = tuple(dict.fromkeys(k for p in parts for k in p.seq_keys))
        keys = list(dict.fromkeys(k for p in parts for k in p.tensors))
        tensors = {}
        for k in keys:
            if k not in seq_keys and any(k not in p.tensors for p in parts):
                raise ValueError(f"cannot join conditionings: {k!r} is missing in some of them")
            like = next(p.tensors[k] for p in parts if k in p.tensors)
            # a sample without a sequence (e.g. no input images) joins with an empty one, padded below
            values = [p.tensors[k] if k in p.tensors else like.new_zeros((len(p), 0, *like.shape[2:]))
                      for p in parts]
            if k in seq_keys:
                longest = max(v.shape[1] for v in values)
                padded = []
                for v in values:
                    if v.shape[1] < longest:
                        pad = v.new_zeros((v.shape[0], longest - v.shape[1], *v.shape[2:]))
                        v = torch.cat([v, pad], dim=1)
                    padded.append(v)
                values = padded
            tensors[k] = torch.cat(values, dim=0)
        return Conditioning(tensors, [lay for p in parts for lay in p.layouts], seq_keys)


@dataclasses.dataclass
class Schedule:
    """A sampling schedule: ``timesteps[i]`` is the denoiser's time input at step ``i``; flow families also carry
    ``sigmas`` (``len(timesteps) + 1`` values from ~1 down to 0); diffusion families carry their DDIM scheduler."""

    timesteps: Any
    sigmas: Any = None
    scheduler: Any = None

    def __len__(self) -> int:
        return len(self.timesteps)


# ================================================================================================ the family
class ModelFamily(ABC):
    """One loaded checkpoint of one family. Construct through :func:`trainers.families.load_family`."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json ``_class_name`` values this family loads
    denoiser_attr: ClassVar[str] = "transformer"  # the pipeline attribute that is trained ("unet" for UNets)
    objective: ClassVar[str] = "flow"  # "epsilon" | "v_prediction" | "flow"
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    sde_types: ClassVar[tuple[str, ...]] = ("flow_sde", "dance_sde", "cps", "ode")
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder",)

    def __init__(self, pipe: Any, path: str):
        self.pipe = pipe
        self.path = str(path)

    # ------------------------------------------------------------------ identity and capabilities
    @property
    def pipeline_class(self) -> str:
        return type(self.pipe).__name__

    @property
    def denoiser(self) -> Any:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def forward_module(self) -> Any:
        """What forwards run through: the denoiser, or its distributed wrapper (:meth:`set_forward_module`)."""
        return getattr(self, "_forward_module", None) or self.denoiser

    def set_forward_module(self, module: Any) -> None:
        """Run forwards through ``module`` (e.g. the ``accelerator.prepare``-d denoiser, for DDP gradient sync)."""
        self._forward_module = module

    @property
    def max_input_images(self) -> int:
        """0: text only; 1: one source image (a reference grid stands in for several); N > 1: several natively."""
        return 0

    @property
    def needs_input_image(self) -> bool:
        """True for edit models that cannot generate from text alone (InstructPix2Pix)."""
        return False

    def check_task(self, task: str) -> None:
        """Raise :class:`UnsupportedTaskError` for a task this checkpoint cannot condition on."""
        if task not in TASKS:
            raise UnsupportedTaskError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        if task == "t2i" and self.needs_input_image:
            raise UnsupportedTaskError(
                f"task 't2i' cannot run on family {self.name!r} ({self.pipeline_class} at {self.path}): "
                "it is an edit model that needs a source image")
        if task in ("edit", "multi_ref") and self.max_input_images < 1:
            raise UnsupportedTaskError(
                f"task {task!r} needs a model that takes input images, but family {self.name!r} "
                f"({self.pipeline_class} at {self.path}) conditions on text only; use an edit checkpoint of the "
                "family (e.g. FLUX.1 Kontext, Qwen-Image-Edit-Plus) for this task")

    def reference_grid_fallback(self, task: str) -> bool:
        """True when ``multi_ref`` references are tiled into one grid image (single-image edit models)."""
        return task == "multi_ref" and self.max_input_images == 1

    def condition_images(self, task: str, source: Any, references: Sequence[Any], size: int) -> list:
        """The PIL images the model conditions on for one sample, resized to ``size`` (square)."""
        from PIL import Image

        self.check_task(task)
        if task == "t2i":
            return []
        if task == "edit":
            if source is None:
                raise ValueError(f"an edit sample needs its source image (family {self.name!r})")
            images = [source]
        else:
            if not references:
                raise ValueError(f"a multi_ref sample needs at least one reference image (family {self.name!r})")
            images = list(references)
            if self.reference_grid_fallback(task):
                from pipelines.candidates import reference_grid

                images = [reference_grid(images, size, size)]
            elif len(images) > self.max_input_images:
                raise ValueError(f"{len(images)} reference images but {self.pipeline_class} takes at most "
                                 f"{self.max_input_images}")
        out = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            out.append(im)
        return out

    # ------------------------------------------------------------------ components
    def to(self, device: Any, dtype: Any = None) -> ModelFamily:
        """Move the frozen components (cast to ``dtype`` when given) and the denoiser (kept in its dtype)."""
        for name in (*self.text_components, "vae"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(device, **({"dtype": dtype} if dtype is not None else {}))
        self.denoiser.to(device)
        return self

    def freeze(self) -> None:
        for name in (*self.text_components, "vae", self.denoiser_attr):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    @property
    def device(self) -> Any:
        return next(self.denoiser.parameters()).device

    @property
    def text_width(self) -> int:
        """Width of the text tokens the denoiser attends to (reward tokens are appended at this width)."""
        cfg = self.denoiser.config
        width = cfg.get("cross_attention_dim") or cfg.get("joint_attention_dim")
        return int(width[0] if isinstance(width, (list, tuple)) else width)

    def append_tokens(self, cond: Conditioning, tokens: Any, keep: Any = None) -> Conditioning:
        """Append extra condition tokens ``(B, K, text_width)`` (e.g. reward tokens) after the text tokens.

        ``keep`` ``(B,)`` bool: samples whose extra tokens are switched off — masked out where the denoiser takes
        a text mask (UNets' ``encoder_attention_mask``, Qwen-Image's ``prompt_mask``), zeroed elsewhere."""
        import torch

        tensors = dict(cond.tensors)
        emb = tensors["prompt_embeds"]
        tokens = tokens.to(emb.dtype)
        b, k = tokens.shape[:2]
        keep_t = torch.ones(b, dtype=torch.bool, device=emb.device) if keep is None else keep.to(emb.device).bool()
        if "prompt_mask" in tensors:
            mask = tensors["prompt_mask"]
            tensors["prompt_mask"] = torch.cat([mask, keep_t[:, None].expand(b, k).to(mask.dtype)], dim=1)
        elif self.denoiser_attr == "unet":
            if keep is not None:
                from trainers.conditioning import reward_token_mask

                tensors["encoder_attention_mask"] = reward_token_mask(b, emb.shape[1], k, keep_t, device=emb.device)
        else:
            tokens = tokens * keep_t[:, None, None].to(tokens.dtype)
        tensors["prompt_embeds"] = torch.cat([emb, tokens], dim=1)
        return Conditioning(tensors, list(cond.layouts), cond.seq_keys)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    # ------------------------------------------------------------------ conditioning and latents
    @abstractmethod
    def encode(self, texts: Sequence[str], images: Sequence[Sequence[Any]] | None = None,
               size: int | None = None) -> Conditioning:
        """Encode a batch. ``images[b]``: the PIL images sample ``b`` conditions on (already from
        :meth:`condition_images`); ``size``: the generated image side (used for image-layout bookkeeping)."""

    @abstractmethod
    def images_to_latents(self, pixels: Any, generator: Any = None, sample: bool = True) -> Any:
        """``(B,3,H,W)`` in ``[-1,1]`` -> the denoiser's latents (packed where the family packs)."""

    @abstractmethod
    def latents_to_images(self, latents: Any, size: int) -> Any:
        """The denoiser's latents -> ``(B,3,size,size)`` pixels in ``[-1,1]``."""

    @abstractmethod
    def noise_shape(self, batch: int, size: int) -> tuple[int, ...]:
        """Shape of the initial noise of ``batch`` images of ``size`` x ``size`` in the denoiser's latent space."""

    def initial_noise(self, generators: Any, size: int, batch: int | None = None) -> Any:
        """Initial latents drawn on the CPU as the family's pipeline draws them: one seeded draw per generator
        when given a list, else one draw of ``batch`` samples from a single generator."""
        import torch

        if isinstance(generators, (list, tuple)):
            noise = torch.cat([torch.randn(self.noise_shape(1, size), generator=g) for g in generators])
        else:
            noise = torch.randn(self.noise_shape(int(batch), size), generator=generators)
        return self.pack_noise(noise).to(self.device)

    def pack_noise(self, noise: Any) -> Any:
        """Unpacked ``(B, C, h, w)`` noise -> the denoiser's latent layout (identity unless the family packs)."""
        return noise

    # ------------------------------------------------------------------ the denoiser
    def predict(self, x: Any, t: Any, cond: Conditioning) -> Any:
        """One forward of the denoiser on ``x`` at time ``t`` (scalar or ``(B,)``) under ``cond``; a batch with
        mixed layouts is run one layout group at a time."""
        import torch

        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        groups: dict[Any, list[int]] = {}
        for i, layout in enumerate(cond.layouts):
            groups.setdefault(layout, []).append(i)
        if len(groups) == 1:
            return self._predict_uniform(x, t, cond)
        out = None
        for index in groups.values():
            idx = torch.as_tensor(index, device=x.device)
            part = self._predict_uniform(x.index_select(0, idx), t.index_select(0, idx), cond.take(index))
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, idx, part)
        return out

    @abstractmethod
    def _predict_uniform(self, x: Any, t: Any, cond: Conditioning) -> Any:
        """:meth:`predict` for a batch whose samples share one layout."""

    def guided_predict(self, x: Any, t: Any, cond: Conditioning, uncond: Conditioning | None,
                       guidance: float) -> Any:
        """Classifier-free guidance ``u + g·(c - u)`` (one batched forward) when ``guidance > 1``."""
        import torch

        if guidance > 1.0 and uncond is not None:
            t = torch.as_tensor(t, device=x.device)
            t2 = torch.cat([t, t]) if t.ndim == 1 else t
            out = self.predict(torch.cat([x, x]), t2, Conditioning.cat([uncond, cond]))
            u, c = out.chunk(2)
            return u + guidance * (c - u)
        return self.predict(x, t, cond)

    # ------------------------------------------------------------------ training objective
    @abstractmethod
    def training_sample(self, x0: Any, generator: Any, noise: Any = None, t: Any = None) -> tuple[Any, Any, Any]:
        """``(x_t, t, target)`` for latents ``x0``: draws noise and timesteps from ``generator`` unless given."""

    def draw_training_time(self, batch: int, generator: Any) -> Any:
        """Timesteps for :meth:`training_sample` (drawn alone so DPO can share them between ``w`` and ``l``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sampling
    @abstractmethod
    def schedule(self, steps: int, size: int) -> Schedule:
        """The sampling schedule for ``steps`` steps at ``size`` x ``size``."""

    @abstractmethod
    def step_mean_std(self, model_output: Any, schedule: Schedule, i: int, x: Any, eta: float,
                      sde_type: str) -> tuple[Any, Any]:
        """Mean and std of the stochastic transition from step ``i`` to ``i + 1``."""

    def check_sde_type(self, sde_type: str) -> None:
        if sde_type not in self.sde_types:
            raise ValueError(f"family {self.name!r} samples with {', '.join(self.sde_types)}; got {sde_type!r}")

    def sample(self, cond: Conditioning, uncond: Conditioning | None, noise: Any, steps: int, size: int,
               guidance: float = 1.0, eta: float = 0.0, sde_type: str | None = None, generator: Any = None,
               reduce: str = "mean", sde_steps: Sequence[int] | None = None) -> dict[str, Any]:
        """Run the sampler from ``noise``: the ODE/deterministic path when ``eta == 0``; with ``eta > 0`` the
        stochastic transition at the steps in ``sde_steps`` (all steps when None) and deterministic elsewhere.

        Returns ``{"latents": (K+1, B, ...), "log_probs": (K, B), "stds": [K floats], "schedule"}``.
        """
        import torch

        from trainers.losses import gaussian_log_prob

        sde_type = sde_type or self.sde_types[0]
        self.check_sde_type(sde_type)
        sched = self.schedule(steps, size)
        window = set(range(len(sched))) if sde_steps is None else set(sde_steps)
        x = noise
        latents, logps, stds = [x], [], []
        with torch.no_grad():
            for i in range(len(sched)):
                out = self.guided_predict(x, sched.timesteps[i], cond, uncond, guidance)
                step_eta = eta if i in window else 0.0
                mean, std = self.step_mean_std(out, sched, i, x, step_eta, sde_type)
                std_t = torch.as_tensor(std, dtype=torch.float32)
                if float(std_t.max()) > 0:
                    z = torch.randn(mean.shape, generator=generator,
                                    device=generator.device if generator is not None else "cpu").to(mean.device)
                    x_next = (mean + std_t.to(mean.device) * z).to(x.dtype)
                    lp = gaussian_log_prob(x_next.float(), mean.float(), std_t.clamp_min(1e-12).to(mean.device),
                                           reduce=reduce)
                else:
                    x_next = mean.to(x.dtype)
                    lp = torch.zeros(x.shape[0], device=x.device)
                x = x_next
                latents.append(x)
                logps.append(lp)
                stds.append(float(std_t.max()))
        return {"latents": torch.stack(latents), "log_probs": torch.stack(logps), "stds": stds, "schedule": sched}

    # ------------------------------------------------------------------ LoRA
    @property
    def lora_prefix(self) -> str:
        return self.denoiser_attr

    def save_lora(self, out_dir: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Write ``out_dir/pytorch_lora_weights.safetensors`` through the pipeline class's ``save_lora_weights``
        (peft config in the metadata so ``load_lora_weights`` restores rank and alpha)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        denoiser = self.denoiser
        metadata = denoiser.peft_config[adapter_name].to_dict()
        metadata = json.loads(json.dumps(metadata, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        type(self.pipe).save_lora_weights(
            str(out_dir),
            safe_serialization=True,
            **{f"{self.denoiser_attr}_lora_layers": self.lora_state_dict(adapter_name),
               f"{self.denoiser_attr}_lora_adapter_metadata": metadata},
        )
        return out_dir

    def lora_state_dict(self, adapter_name: str = "default") -> dict:
        """The adapter's weights in the key format the family's diffusers loader expects."""
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.denoiser, adapter_name=adapter_name)
        return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}

    def read_lora(self, adapter_dir: str | os.PathLike) -> tuple[dict, dict | None]:
        """``(denoiser state dict in peft keys, LoraConfig dict or None)`` from a saved adapter."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(adapter_dir)
        file = path if path.is_file() else path / LORA_WEIGHT_NAME
        if not file.is_file():
            raise FileNotFoundError(f"no LoRA weights at {file}")
        prefix = self.lora_prefix + "."
        raw = load_file(str(file))
        sd = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"{file} holds no {self.denoiser_attr} LoRA weights (keys start with "
                             f"{sorted({k.split('.')[0] for k in raw})}); was it trained on another family?")
        sd = self._lora_keys_to_peft(sd)
        config = None
        with safe_open(str(file), framework="pt") as fh:
            meta = (fh.metadata() or {}).get("lora_adapter_metadata")
        if meta:
            packed = json.loads(meta)
            config = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)} or None
        return sd, config

    def _lora_keys_to_peft(self, sd: dict) -> dict:
        return sd


# ================================================================================================ helpers
def dynamic_shift_mu(scheduler_config: Any, image_seq_len: int) -> float:
    """FLUX / Qwen-Image's resolution-dependent shift ``mu`` (linear in the image token count)."""
    get = scheduler_config.get if hasattr(scheduler_config, "get") else lambda k, d=None: getattr(scheduler_config, k, d)
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


__all__ = ["Conditioning", "LORA_WEIGHT_NAME", "ModelFamily", "Schedule", "TASKS", "UnsupportedTaskError",
           "dynamic_shift_mu"]
