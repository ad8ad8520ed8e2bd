"""``sd``: Stable Diffusion 1.x / 2.x UNets (ε or v prediction, DDIM sampling), and InstructPix2Pix for edits.

Text conditioning is CLIP's last hidden state padded to 77 tokens. An InstructPix2Pix checkpoint (UNet with 8 input
channels) conditions on one source image: its VAE latent (posterior mode, unscaled, as the pipeline encodes it) is
concatenated to the noisy latent along channels. Several references reach such a model as one tiled grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainers.families.base import Conditioning, ModelFamily, Schedule


class SDFamily(ModelFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionInstructPix2PixPipeline")
    denoiser_attr = "unet"
    sde_types = ("ddim",)
    text_components = ("text_encoder",)

    @property
    def objective(self) -> str:  # type: ignore[override]
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def max_input_images(self) -> int:
        return 1 if self.denoiser.config.in_channels > self.vae_latent_channels else 0

    @property
    def needs_input_image(self) -> bool:
        return self.max_input_images == 1

    @property
    def vae_latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, texts: Sequence[str]) -> dict[str, Any]:
        import torch

        tok = self.pipe.tokenizer(list(texts), padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        with torch.no_grad():
            emb = self.pipe.text_encoder(tok.input_ids.to(self.pipe.text_encoder.device))[0]
        return {"prompt_embeds": emb.to(self.device)}

    def encode(self, texts, images=None, size=None) -> Conditioning:
        import torch

        tensors = self.encode_text(texts)
        layouts: list[Any] = ["text"] * len(texts)
        if self.max_input_images:
            if images is None or any(len(ims) != 1 for ims in images):
                raise ValueError(f"{self.pipeline_class} conditions on exactly one source image per sample")
            pixels = torch.stack([_to_tensor(ims[0]) for ims in images]).to(self.device, self.pipe.vae.dtype)
            with torch.no_grad():
                tensors["image_latents"] = self.pipe.vae.encode(pixels).latent_dist.mode().float()
            layouts = ["image"] * len(texts)
        return Conditioning(tensors, layouts)

    # ------------------------------------------------------------------ latents
    def _vae_factors(self) -> tuple[float, float]:
        cfg = self.pipe.vae.config
        return float(getattr(cfg, "scaling_factor", 1.0) or 1.0), float(getattr(cfg, "shift_factor", None) or 0.0)

    def images_to_latents(self, pixels, generator=None, sample: bool = True):
        import torch

        vae = self.pipe.vae
        scale, shift = self._vae_factors()
        with torch.no_grad():
            dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mode()
        return ((z - shift) * scale).float()

    def latents_to_images(self, latents, size: int):
        vae = self.pipe.vae
        scale, shift = self._vae_factors()
        return vae.decode(latents.to(vae.dtype) / scale + shift).sample.clamp(-1, 1)

    def noise_shape(self, batch: int, size: int) -> tuple[int, ...]:
        side = size // self.vae_scale_factor
        return (batch, self.vae_latent_channels, side, side)

    # ------------------------------------------------------------------ the denoiser
    def _unet_kwargs(self, cond: Conditioning, batch: int) -> dict[str, Any]:
        return {}

    def _predict_uniform(self, x, t, cond: Conditioning):
        model_in = x
        if "image_latents" in cond.tensors:
            import torch

            model_in = torch.cat([x, cond.tensors["image_latents"].to(x.dtype)], dim=1)
        emb = cond.tensors["prompt_embeds"]
        mask = cond.tensors.get("encoder_attention_mask")
        kwargs = self._unet_kwargs(cond, x.shape[0])
        if mask is not None:
            kwargs["encoder_attention_mask"] = mask
        return self.forward_module(model_in, t, emb, **kwargs).sample

    # ------------------------------------------------------------------ training objective
    def _ddpm(self):
        from diffusers import DDPMScheduler

        if getattr(self, "_ddpm_scheduler", None) is None:
            self._ddpm_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        return self._ddpm_scheduler

    def draw_training_time(self, batch: int, generator: Any, size: int | None = None):
        import torch

        return torch.randint(0, self._ddpm().config.num_train_timesteps, (batch,), generator=generator)

    def training_sample(self, x0, generator, noise=None, t=None):
        import torch

        from trainers.losses import noise_prediction_target

        if noise is None:
            noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        if t is None:
            t = self.draw_training_time(x0.shape[0], generator)
        t = torch.as_tensor(t).long().to(x0.device)
        sched = self._ddpm()
        return sched.add_noise(x0, noise, t), t, noise_prediction_target(sched, x0, noise, t)

    # ------------------------------------------------------------------ sampling
    def schedule(self, steps: int, size: int) -> Schedule:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return Schedule(timesteps=scheduler.timesteps.clone(), scheduler=scheduler)

    def step_mean_std(self, model_output, schedule: Schedule, i: int, x, eta: float, sde_type: str = "ddim"):
        from trainers.losses import ddim_mean_std

        return ddim_mean_std(schedule.scheduler, model_output.float(), schedule.timesteps[i], x.float(), eta)

    # ------------------------------------------------------------------ LoRA (diffusers' UNet key format)
    def lora_state_dict(self, adapter_name: str = "default") -> dict:
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(super().lora_state_dict(adapter_name))

    def _lora_keys_to_peft(self, sd: dict) -> dict:
        from diffusers.utils import convert_unet_state_dict_to_peft

        return convert_unet_state_dict_to_peft(sd)


def _to_tensor(image):
    """PIL RGB -> ``(3,H,W)`` float in ``[-1, 1]``."""
    import numpy as np
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def pil_batch_to_tensor(images: Sequence[Any]):
    """PIL images of one size -> ``(B,3,H,W)`` in ``[-1,1]``."""
    import torch

    return torch.stack([_to_tensor(im) for im in images])
