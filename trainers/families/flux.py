"""``flux``: FLUX.1 text-to-image (``FluxPipeline``) and FLUX.1 Kontext for edits (``FluxKontextPipeline``).

Conditions on T5 token states, CLIP's pooled projection and FLUX's 3-axis RoPE ids. Latents are packed 2x2 patches.
Kontext appends the input images' packed VAE latents to the image tokens with ids whose first axis is 1; several
input images are placed side by side on the height axis of those ids (each its own block of positions), so
multi-reference samples reach the model natively. Guidance-distilled checkpoints (FLUX.1-dev) get the embedded
guidance ``embedded_guidance`` instead of true classifier-free guidance. Flow matching with dynamic shifting.
"""

from __future__ import annotations

import contextlib
from typing import Any

from trainers.families.base import Conditioning
from trainers.families.flow import FlowMatchingFamily
from trainers.families.sd import SDFamily, pil_batch_to_tensor

MAX_KONTEXT_IMAGES = 4


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxKontextPipeline")
    text_components = ("text_encoder", "text_encoder_2")
    embedded_guidance: float = 3.5

    @property
    def is_kontext(self) -> bool:
        return self.pipeline_class == "FluxKontextPipeline"

    @property
    def max_input_images(self) -> int:
        return MAX_KONTEXT_IMAGES if self.is_kontext else 0

    @property
    def max_sequence_length(self) -> int:
        return min(512, int(self.pipe.tokenizer_2.model_max_length))

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4

    _vae_factors = SDFamily._vae_factors

    def latent_side(self, size: int) -> int:
        return 2 * (int(size) // (self.vae_scale_factor * 2))

    # ------------------------------------------------------------------ conditioning
    def encode(self, texts, images=None, size=None, text_grad: bool = False) -> Conditioning:
        """Every sampler encodes without gradients; ``text_grad`` lets them flow into both text encoders (training
        them jointly with the transformer, as the proving ground's world generator does). Input images never take
        gradients."""
        import torch

        with contextlib.nullcontext() if text_grad else torch.no_grad():
            embeds, pooled, _text_ids = self.pipe.encode_prompt(
                prompt=list(texts), prompt_2=None, device=self.pipe.text_encoder.device,
                max_sequence_length=self.max_sequence_length)
        device = self.device
        tensors: dict[str, Any] = {"prompt_embeds": embeds.to(device), "pooled": pooled.to(device)}
        counts = [len(ims) for ims in images] if images is not None else [0] * len(texts)
        if any(counts):
            if not self.is_kontext:
                raise ValueError(f"{self.pipeline_class} takes no input images")
            if len(set(counts)) != 1:
                # one forward per image count: encode groups separately and join (layouts keep them apart)
                parts = [None] * len(texts)
                for n in sorted(set(counts)):
                    idx = [i for i, c in enumerate(counts) if c == n]
                    sub = self.encode([texts[i] for i in idx], [images[i] for i in idx], size, text_grad)
                    for j, i in enumerate(idx):
                        parts[i] = sub.take([j])
                return Conditioning.cat(parts)
            n = counts[0]
            flat = [im for ims in images for im in ims]
            pixels = pil_batch_to_tensor(flat).to(device, self.pipe.vae.dtype)
            with torch.no_grad():
                z = self.pipe.vae.encode(pixels).latent_dist.mode()
            scale, shift = self._vae_factors()
            packed = self.pack(((z - shift) * scale).float())  # (B*n, S, 4C)
            tensors["image_latents"] = packed.view(len(texts), n * packed.shape[1], packed.shape[2])
            side = z.shape[-1]
            layouts = [("images", n, side)] * len(texts)
        else:
            layouts = ["text"] * len(texts)
        return Conditioning(tensors, layouts, seq_keys=("image_latents",))

    # ------------------------------------------------------------------ latents
    def noise_shape(self, batch: int, size: int):
        side = self.latent_side(size)
        return (batch, self.latent_channels, side, side)  # drawn unpacked (as the pipeline does), then packed

    def pack_noise(self, noise):
        return self.pack(noise)

    def images_to_latents(self, pixels, generator=None, sample: bool = True):
        return self.pack(SDFamily.images_to_latents(self, pixels, generator, sample))

    def latents_to_images(self, latents, size: int):
        return SDFamily.latents_to_images(self, self.unpack(latents, self.latent_side(size)), size)

    # ------------------------------------------------------------------ the denoiser
    def _ids(self, layout, tokens: int, device, dtype):
        import torch

        side = int(round(tokens ** 0.5))
        img_ids = self.pipe._prepare_latent_image_ids(1, side, side, device, dtype)
        if layout == "text":
            return img_ids
        _, n, latent_side = layout
        half = latent_side // 2
        blocks = []
        for k in range(n):
            ids = self.pipe._prepare_latent_image_ids(1, half, half, device, dtype)
            ids[..., 0] = 1
            ids[..., 1] += k * half  # each input image on its own rows of positions
            blocks.append(ids)
        return torch.cat([img_ids, *blocks], dim=0)

    def _predict_uniform(self, x, t, cond: Conditioning):
        import torch

        layout = cond.layouts[0]
        tokens = x.shape[1]
        hidden = x
        if layout != "text":
            _, n, latent_side = layout
            image_tokens = n * (latent_side // 2) ** 2  # the batch may be padded for samples with more images
            hidden = torch.cat([x, cond.tensors["image_latents"][:, :image_tokens].to(x.dtype)], dim=1)
        embeds = cond.tensors["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype)
        img_ids = self._ids(layout, tokens, x.device, embeds.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([x.shape[0]], self.embedded_guidance, device=x.device, dtype=torch.float32)
        out = self.forward_module(hidden_states=hidden, timestep=t / 1000, guidance=guidance,
                            pooled_projections=cond.tensors["pooled"], encoder_hidden_states=embeds,
                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out[:, :tokens]

