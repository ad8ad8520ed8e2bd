"""``qwen_image``: Qwen-Image text-to-image (``QwenImagePipeline``) and Qwen-Image-Edit-Plus
(``QwenImageEditPlusPipeline``: 1..N input images natively — DyRef's base model, Qwen-Image-Edit-2511).

Text (and, for the edit model, the input images) are encoded by the Qwen2.5-VL text encoder through the
pipeline's own ``encode_prompt``; the hidden states have a per-sample length with a mask. The edit model also sees
each input image's packed, normalised VAE latents appended to the image tokens, described by ``img_shapes``.
Unlike the pipeline's ``__call__`` (which resizes every input image to ~1024² for the VAE and ~384² for the text
encoder whatever the output size), the family encodes input images at the size it is given — the generated
size, or the training resolution — which is what makes tiny models and low-resolution training practical.
"""

from __future__ import annotations

from typing import Any

from trainers.families.base import Conditioning
from trainers.families.flow import FlowMatchingFamily
from trainers.families.sd import pil_batch_to_tensor


class QwenImageFamily(FlowMatchingFamily):
    name = "qwen_image"
    pipeline_classes = ("QwenImagePipeline", "QwenImageEditPlusPipeline", "QwenImageEditPipeline")
    text_components = ("text_encoder",)
    max_sequence_length = 1024

    @property
    def is_edit(self) -> bool:
        return self.pipeline_class in ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")

    @property
    def max_input_images(self) -> int:
        if self.pipeline_class == "QwenImageEditPlusPipeline":
            return 8
        return 1 if self.is_edit else 0

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.z_dim)

    def latent_side(self, size: int) -> int:
        return 2 * (int(size) // (self.vae_scale_factor * 2))

    # ------------------------------------------------------------------ VAE (normalised latents, a frame axis)
    def _norm(self, like):
        import torch

        c = self.latent_channels
        mean = torch.tensor(self.pipe.vae.config.latents_mean).view(1, c, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(self.pipe.vae.config.latents_std).view(1, c, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def _encode_pixels(self, pixels, generator=None, sample: bool = False):
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mode()
        mean, std = self._norm(z)
        return ((z - mean) / std)[:, :, 0].float()  # (B, C, h, w)

    def images_to_latents(self, pixels, generator=None, sample: bool = True):
        return self.pack(self._encode_pixels(pixels, generator, sample))

    def latents_to_images(self, latents, size: int):
        z = self.unpack(latents, self.latent_side(size)).unsqueeze(2)
        mean, std = self._norm(z)
        vae = self.pipe.vae
        return vae.decode((z * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0].clamp(-1, 1)

    def noise_shape(self, batch: int, size: int):
        side = self.latent_side(size)
        return (batch, self.latent_channels, side, side)

    def pack_noise(self, noise):
        return self.pack(noise)

    def _text(self, texts, images=None):
        import torch

        kwargs: dict[str, Any] = {"prompt": list(texts), "device": self.pipe.text_encoder.device,
                                  "max_sequence_length": self.max_sequence_length}
        if images is not None:
            kwargs["image"] = list(images)
        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(**kwargs)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def encode(self, texts, images=None, size=None) -> Conditioning:
        import torch

        device = self.device
        counts = [len(ims) for ims in images] if images is not None else [0] * len(texts)
        if not any(counts):
            if self.is_edit:
                # the edit pipeline's template expects images; text-only prompts use the same encoder
                parts = [self._text([t], None) for t in texts]
            else:
                embeds, mask = self._text(texts)
                return Conditioning({"prompt_embeds": embeds.to(device), "prompt_mask": mask.to(device)},
                                    ["text"] * len(texts), seq_keys=("prompt_embeds", "prompt_mask"))
        else:
            if not self.is_edit:
                raise ValueError(f"{self.pipeline_class} takes no input images")
            # one text-encoder call per sample: its images are part of its prompt
            parts = [self._text([t], ims if ims else None) for t, ims in zip(texts, images)]
        conds = []
        for (embeds, mask), ims in zip(parts, images or [[]] * len(texts)):
            tensors = {"prompt_embeds": embeds.to(device), "prompt_mask": mask.to(device)}
            layout: Any = "text"
            if ims:
                z = self._encode_pixels(pil_batch_to_tensor(ims).to(device))  # (n, C, h, w)
                packed = self.pack(z)  # (n, S, 4C)
                tensors["image_latents"] = packed.reshape(1, -1, packed.shape[-1])
                layout = ("images", tuple((1, z.shape[-2] // 2, z.shape[-1] // 2) for _ in ims))
            conds.append(Conditioning(tensors, [layout], seq_keys=("prompt_embeds", "prompt_mask", "image_latents")))
        return Conditioning.cat(conds)

    # ------------------------------------------------------------------ the denoiser
    def _predict_uniform(self, x, t, cond: Conditioning):
        import torch

        layout = cond.layouts[0]
        tokens = x.shape[1]
        side = int(round(tokens ** 0.5))
        shapes = [(1, side, side)]
        hidden = x
        if layout != "text":
            image_shapes = list(layout[1])
            image_tokens = sum(h * w for _, h, w in image_shapes)
            hidden = torch.cat([x, cond.tensors["image_latents"][:, :image_tokens].to(x.dtype)], dim=1)
            shapes += image_shapes
        mask = cond.tensors["prompt_mask"]
        embeds = cond.tensors["prompt_embeds"]
        out = self.forward_module(hidden_states=hidden, timestep=t / 1000, guidance=None, encoder_hidden_states_mask=mask,
                            encoder_hidden_states=embeds, img_shapes=[shapes] * x.shape[0], return_dict=False)[0]
        return out[:, :tokens]
