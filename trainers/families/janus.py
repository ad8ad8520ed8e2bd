"""The autoregressive family: Janus / Janus-Pro (``JanusForConditionalGeneration`` in transformers), a Llama that
predicts VQ image tokens one at a time, decoded to pixels by the checkpoint's VQ-VAE.

This family deliberately does **not** implement :class:`trainers.families.base.ModelFamily`: that interface is about
denoisers (noise, timesteps, latents, SDE steps) and nothing in it applies to a token sampler. It implements what
candidate generation (:class:`pipelines.generation.ImageGenerator`) and the AR GRPO trainer (:mod:`trainers.ar_grpo`)
need, under the same names where the meaning is the same (``name``, ``path``, ``pipeline_class``, ``check_task``,
``max_input_images``, ``needs_input_image``, ``denoiser`` = the trained module, ``lora_target_modules``,
``save_lora`` / ``read_lora``, ``freeze``, ``to``, ``device``):

- :meth:`encode`: Janus-Pro's generation prompt (the processor's chat template, ``<|User|>: text`` then
  ``<|Assistant|>:``, then ``<begin_of_image>`` appended by ``JanusProcessor(generation_mode="image")``), left-padded;
  the unconditional branch for classifier-free guidance is built as ``JanusForConditionalGeneration.generate``
  builds it (every prompt token except BOS and ``<begin_of_image>`` replaced by the pad token, same mask);
- :meth:`sample`: the token loop of ``generate(generation_mode="image")`` (KV cache, generation head, the CFG mix
  ``u + s·(c - u)`` of ``ClassifierFreeGuidanceLogitsProcessor``, ``temperature``), but with **one seeded
  generator per request** (each request's uniforms are drawn up front from its own ``torch.Generator`` and
  inverted through the CDF, so an image does not depend on its batch), returning every token's exact
  log-probability and the entropy of the distribution it was drawn from; ``guidance_scale <= 1`` samples from the
  conditional logits alone (no CFG, one branch);
- :meth:`token_logits`: the same distributions recomputed with gradients in one teacher-forced forward (what
  GRPO's ratio needs); :meth:`decode`: VQ tokens -> pixels in ``[0, 1]`` (the processor's mean/std inverted).

Tasks: text-to-image only (Janus generates from text; edit / multi_ref raise :class:`UnsupportedTaskError`).
LoRA: on the language model's attention and MLP projections and on the generation aligner and head (the image-token
path); adapters are written in PEFT's format (``adapter_model.safetensors`` + ``adapter_config.json``), which
``JanusForConditionalGeneration.load_adapter(dir)`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainers.families.base import UnsupportedTaskError

ARCHITECTURES = ("JanusForConditionalGeneration",)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_LORA_PARENTS = ("model.language_model.", "model.generation_head.", "model.generation_aligner.")


@dataclasses.dataclass
class TokenPrompts:
    """Encoded generation prompts: left-padded ``input_ids`` / ``attention_mask`` (B, L) and, with CFG, the
    unconditional ids (same shape and mask)."""

    input_ids: Any
    attention_mask: Any
    uncond_ids: Any = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def take(self, index: Sequence[int] | slice) -> TokenPrompts:
        import torch

        if isinstance(index, slice):
            index = list(range(len(self)))[index]
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.input_ids.device)
        return TokenPrompts(self.input_ids[idx], self.attention_mask[idx],
                            None if self.uncond_ids is None else self.uncond_ids[idx])


class JanusFamily:
    """A loaded Janus checkpoint (see the module docstring for what it implements and why)."""

    name = "janus"
    autoregressive = True
    sde_types: tuple[str, ...] = ()
    max_input_images = 0
    needs_input_image = False

    def __init__(self, model: Any, processor: Any, path: str):
        self.model = model
        self.processor = processor
        self.path = str(path)
        gen = model.generation_config
        self.bos_id = int(gen.bos_token_id)
        self.pad_id = int(gen.pad_token_id)
        kwargs = getattr(gen, "generation_kwargs", None) or {}
        tok = processor.tokenizer
        self.boi_id = int(kwargs.get("boi_token_id", tok.convert_tokens_to_ids(tok.boi_token)))
        self.default_guidance = float(getattr(gen, "guidance_scale", None) or 5.0)
        self.default_temperature = float(getattr(gen, "temperature", None) or 1.0)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, device: Any = None, dtype: Any = None, freeze: bool = True) -> JanusFamily:
        from labelers import torch_compat

        torch_compat.install()
        import transformers
        from transformers import JanusForConditionalGeneration, JanusProcessor

        transformers.utils.logging.disable_progress_bar()
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = JanusForConditionalGeneration.from_pretrained(path, **kwargs).eval()
        family = cls(model, JanusProcessor.from_pretrained(path), path)
        if freeze:
            family.freeze()
        if device is not None:
            family.to(device)
        return family

    @property
    def pipeline_class(self) -> str:
        return type(self.model).__name__

    @property
    def pipe(self) -> Any:
        return self.model

    @property
    def denoiser(self) -> Any:
        """The trained module (the name is the families' shared one): the whole Janus model, LoRA on its LM path."""
        return self.model

    def check_task(self, task: str) -> None:
        if task != "t2i":
            raise UnsupportedTaskError(f"task {task!r} is not supported by the {self.name} family "
                                       f"({self.pipeline_class} generates images from text only)")

    def to(self, device: Any, dtype: Any = None) -> JanusFamily:
        self.model.to(device=device, dtype=dtype) if dtype is not None else self.model.to(device)
        return self

    def freeze(self) -> None:
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def num_image_tokens(self) -> int:
        q = self.model.model.vqmodel.quantize.quant_state_dims
        return int(q[0] * q[1])

    @property
    def codebook_size(self) -> int:
        return int(self.model.model.vqmodel.config.num_embeddings)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "text", "text": str(text)}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return str(text)

    def encode(self, texts: Sequence[str], guidance_scale: float = 1.0) -> TokenPrompts:
        """The generation prompts of ``texts`` (``JanusProcessor(generation_mode="image")``), left-padded; with
        ``guidance_scale > 1`` also the unconditional ids that ``generate`` would build."""
        import torch

        inputs = self.processor(text=[self.prompt_text(t) for t in texts], generation_mode="image", padding=True,
                                return_tensors="pt")
        ids = inputs["input_ids"].to(self.device)
        mask = inputs["attention_mask"].to(self.device)
        uncond = None
        if guidance_scale > 1.0:
            keep = (ids == self.bos_id) | (ids == self.boi_id)
            uncond = torch.where(keep, ids, torch.full_like(ids, self.pad_id))
        return TokenPrompts(ids, mask, uncond)

    # ------------------------------------------------------------------ the policy
    def _lm(self, inputs_embeds, attention_mask, past_key_values=None):
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -inputs_embeds.shape[1]:]
        return self.model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                               position_ids=positions, past_key_values=past_key_values,
                                               use_cache=past_key_values is not None)

    def _branches(self, prompts: TokenPrompts, guided: bool):
        import torch

        if not guided:
            return prompts.input_ids, prompts.attention_mask
        return (torch.cat([prompts.input_ids, prompts.uncond_ids]),
                torch.cat([prompts.attention_mask, prompts.attention_mask]))

    @staticmethod
    def mix(logits, batch: int, guidance_scale: float, temperature: float):
        """Guided, tempered logits: ``(u + s·(c - u)) / T`` for a stacked ``[cond; uncond]`` batch, else ``c / T``."""
        if logits.shape[0] == 2 * batch:
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + guidance_scale * (cond - uncond)
        return logits / temperature

    def _check_guidance(self, prompts: TokenPrompts, guidance_scale: float) -> bool:
        guided = guidance_scale > 1.0
        if guided and prompts.uncond_ids is None:
            raise ValueError("guidance_scale > 1 needs prompts encoded with the same guidance_scale (no uncond ids)")
        return guided

    def sample(self, prompts: TokenPrompts, generators: Sequence[Any] | None, guidance_scale: float = 1.0,
               temperature: float = 1.0, greedy: bool = False) -> dict[str, Any]:
        """Sample ``num_image_tokens`` tokens per prompt (no gradients).

        ``generators``: one ``torch.Generator`` per prompt (the request's seed); its ``num_image_tokens`` uniforms
        are drawn up front, and token ``t`` is the inverse CDF of the guided, tempered distribution at ``u_t``.
        Returns ``tokens`` (B, N) long, ``log_probs`` (B, N) (each token's exact log-probability under the
        distribution it was drawn from; 0 when ``greedy``), ``entropy`` (B, N)."""
        import torch
        from transformers import DynamicCache

        guided = self._check_guidance(prompts, guidance_scale)
        B, N = len(prompts), self.num_image_tokens
        if not greedy:
            if generators is None or len(generators) != B:
                raise ValueError(f"sample needs one generator per prompt ({B})")
            uniforms = torch.stack([torch.rand(N, generator=g, dtype=torch.float64) for g in generators])
            uniforms = uniforms.to(self.device)
        ids, mask = self._branches(prompts, guided)
        embeds = self.model.get_input_embeddings()(ids)
        cache = DynamicCache()
        tokens = torch.zeros((B, N), dtype=torch.long, device=self.device)
        log_probs = torch.zeros((B, N), dtype=torch.float32, device=self.device)
        entropy = torch.zeros((B, N), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for t in range(N):
                out = self._lm(embeds, mask, cache)
                head = self.model.model.generation_head(out.last_hidden_state[:, -1, :])
                logp = torch.log_softmax(self.mix(head.float(), B, guidance_scale, temperature), dim=-1)
                probs = logp.exp()
                if greedy:
                    nxt = logp.argmax(-1)
                else:
                    cdf = probs.double().cumsum(-1)
                    nxt = torch.searchsorted(cdf, (uniforms[:, t] * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
                    nxt = nxt.clamp_max(probs.shape[-1] - 1)
                tokens[:, t] = nxt
                log_probs[:, t] = logp.gather(-1, nxt[:, None])[:, 0]
                entropy[:, t] = -(probs * logp).sum(-1)
                step_tokens = torch.cat([nxt, nxt]) if guided else nxt
                embeds = self.model.prepare_embeddings_for_image_generation(step_tokens[:, None])
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        return {"tokens": tokens, "log_probs": log_probs, "entropy": entropy}

    def token_logits(self, prompts: TokenPrompts, tokens: Any, guidance_scale: float = 1.0,
                     temperature: float = 1.0) -> Any:
        """The guided, tempered logits (B, N, V) of every image token given the prompt and the tokens before it, in
        one teacher-forced forward (with gradients when enabled): ``log_softmax`` of them at ``tokens`` is the
        policy's log-probability of the sampled sequence."""
        import torch

        guided = self._check_guidance(prompts, guidance_scale)
        B, N = tokens.shape
        ids, mask = self._branches(prompts, guided)
        tok = torch.cat([tokens, tokens]) if guided else tokens
        prompt_embeds = self.model.get_input_embeddings()(ids)
        image_embeds = self.model.prepare_embeddings_for_image_generation(tok[:, :-1])
        embeds = torch.cat([prompt_embeds, image_embeds.to(prompt_embeds.dtype)], dim=1)
        full_mask = torch.cat([mask, mask.new_ones((mask.shape[0], N - 1))], dim=1)
        hidden = self._lm(embeds, full_mask).last_hidden_state
        L = ids.shape[1]
        head = self.model.model.generation_head(hidden[:, L - 1: L - 1 + N, :])
        return self.mix(head.float(), B, guidance_scale, temperature)

    # ------------------------------------------------------------------ pixels
    def decode(self, tokens: Any) -> Any:
        """VQ tokens (B, N) -> pixels (B, 3, H, W) in [0, 1] (the image processor's normalisation inverted)."""
        import torch

        with torch.no_grad():
            x = self.model.model.vqmodel.decode(tokens.long()).float()
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    def decode_pil(self, tokens: Any) -> list:
        from trainers.common import tensor_to_pil

        return tensor_to_pil(self.decode(tokens).cpu() * 2.0 - 1.0)  # tensor_to_pil takes [-1, 1]

    def generate(self, texts: Sequence[str], seeds: Sequence[int], guidance_scale: float = 1.0,
                 temperature: float | None = None) -> list:
        """PIL images, one per (text, seed): each request's tokens drawn from its own seeded generator."""
        import torch

        prompts = self.encode(texts, guidance_scale)
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        temp = self.default_temperature if temperature is None else float(temperature)
        with torch.inference_mode():
            out = self.sample(prompts, gens, guidance_scale, temp, greedy=temp <= 0)
        return self.decode_pil(out["tokens"])

    # ------------------------------------------------------------------ LoRA (PEFT format)
    @property
    def lora_target_modules(self) -> list[str]:
        import torch

        return [n for n, m in self.model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith(_LORA_PARENTS)]

    def save_lora(self, out_dir: str | os.PathLike, adapter_name: str = "default") -> Path:
        """``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's layout; ``model.load_adapter(dir)``)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = get_peft_model_state_dict(self.model, adapter_name=adapter_name)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(out / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        config = self.model.peft_config[adapter_name]
        config.base_model_name_or_path = self.path
        config.save_pretrained(str(out))
        return out

    def read_lora(self, adapter_dir: str | os.PathLike) -> tuple[dict, dict | None]:
        from safetensors.torch import load_file

        path = Path(adapter_dir)
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"no PEFT adapter weights at {path / ADAPTER_WEIGHTS}")
        config = json.loads((path / ADAPTER_CONFIG).read_text()) if (path / ADAPTER_CONFIG).is_file() else None
        return load_file(str(path / ADAPTER_WEIGHTS)), config


__all__ = ["ARCHITECTURES", "JanusFamily", "TokenPrompts"]
