"""``sd3``: Stable Diffusion 3 / 3.5 (MMDiT ``SD3Transformer2DModel``), text-to-image.

Conditions on CLIP-L + CLIP-G (+ T5 when the checkpoint has it) token states and the two CLIPs' pooled projections,
through the pipeline's own ``encode_prompt``. Flow matching with SD3's fixed ``shift`` (3.0 for SD3/3.5).
"""

from __future__ import annotations

from trainers.families.base import Conditioning
from trainers.families.flow import FlowMatchingFamily
from trainers.families.sd import SDFamily


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3")

    @property
    def max_sequence_length(self) -> int:
        # T5 tokens; without T5 (text_encoder_3 None) the pipeline fills them with zeros, so keep few.
        if getattr(self.pipe, "text_encoder_3", None) is None:
            return 8
        return min(256, int(self.pipe.tokenizer_3.model_max_length))

    def encode(self, texts, images=None, size=None) -> Conditioning:
        import torch

        with torch.no_grad():
            embeds, _neg, pooled, _neg_pooled = self.pipe.encode_prompt(
                prompt=list(texts), prompt_2=None, prompt_3=None, device=self.pipe.text_encoder.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        device = self.device
        return Conditioning({"prompt_embeds": embeds.to(device), "pooled": pooled.to(device)},
                            ["text"] * len(texts))

    _vae_factors = SDFamily._vae_factors
    images_to_latents = SDFamily.images_to_latents
    latents_to_images = SDFamily.latents_to_images

    def noise_shape(self, batch: int, size: int):
        side = size // self.vae_scale_factor
        return (batch, int(self.denoiser.config.in_channels), side, side)

    def image_seq_len(self, size: int) -> int:
        side = size // self.vae_scale_factor
        return side * side

    def _predict_uniform(self, x, t, cond: Conditioning):
        return self.forward_module(hidden_states=x, timestep=t, encoder_hidden_states=cond.tensors["prompt_embeds"],
                             pooled_projections=cond.tensors["pooled"], return_dict=False)[0]
