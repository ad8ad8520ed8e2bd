"""``sdxl``: Stable Diffusion XL — two text encoders (penultimate hidden states concatenated), the second
encoder's pooled projection and the size/crop ``time_ids`` as added conditions of the UNet. DDIM sampling and the
DDPM objective as for ``sd``; text-to-image only."""

from __future__ import annotations

from trainers.families.base import Conditioning
from trainers.families.sd import SDFamily


class SDXLFamily(SDFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_components = ("text_encoder", "text_encoder_2")

    @property
    def max_input_images(self) -> int:
        return 0

    def encode(self, texts, images=None, size=None) -> Conditioning:
        import torch

        size = int(size or self.pipe.default_sample_size * self.vae_scale_factor)
        with torch.no_grad():
            embeds, _neg, pooled, _neg_pooled = self.pipe.encode_prompt(
                list(texts), device=self.pipe.text_encoder_2.device, do_classifier_free_guidance=False)
        time_ids = self.pipe._get_add_time_ids(
            (size, size), (0, 0), (size, size), dtype=embeds.dtype,
            text_encoder_projection_dim=int(self.pipe.text_encoder_2.config.projection_dim))
        device = self.device
        return Conditioning({"prompt_embeds": embeds.to(device), "text_embeds": pooled.to(device),
                             "time_ids": time_ids.repeat(len(texts), 1).to(device)}, ["text"] * len(texts))

    def _unet_kwargs(self, cond: Conditioning, batch: int):
        return {"added_cond_kwargs": {"text_embeds": cond.tensors["text_embeds"],
                                      "time_ids": cond.tensors["time_ids"]}}
