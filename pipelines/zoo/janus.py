"""Tiny randomly initialised Janus-Pro (an autoregressive VQ-token text-to-image model), saved in the layout of a
real ``deepseek-community/Janus-Pro-1B`` checkpoint.

``build_janus(out_dir)`` writes ``config.json`` (``JanusForConditionalGeneration``: a Llama language model, the
SigLIP-style understanding encoder, the VQ-VAE that decodes image tokens, the generation embeddings / aligner / head),
``generation_config.json`` (``boi_token_id``, ``pad_token_id``, ``guidance_scale`` as the real checkpoint carries
them), ``model.safetensors`` and a ``JanusProcessor`` (``JanusImageProcessor`` + a tokenizer with Janus's special
tokens and the ``<|User|>: ... <|Assistant|>:`` chat template). It reloads with
``JanusForConditionalGeneration.from_pretrained(dir)`` / ``JanusProcessor.from_pretrained(dir)`` exactly as the real
checkpoint does; :class:`trainers.families.janus.JanusFamily` detects it from ``config.json``'s ``architectures``.

Sizes (real Janus-Pro in brackets): image 64x64 [384], 4x4 = 16 image tokens [24x24 = 576], VQ downsampling 16
[16], codebook 64 entries [16384], Llama with 2 layers of width 32 [24 layers, 2048]; about 0.3 M parameters.
The tokenizer is a byte-level BPE without merges (the 256 byte tokens, then the special tokens), built in memory.
Built by ``make zoo`` with the other random components (a few seconds); changing any knob below changes the
weights: rebuild with ``python -m pipelines.zoo --force --only janus``.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 20260113
IMAGE_SIZE = 64
PATCH = 16  # -> IMAGE_SIZE // PATCH = 4 -> 4x4 image tokens
CODEBOOK = 64
HIDDEN = 32
# Janus's special tokens (ids follow the 256 byte tokens, in this order)
PAD = "<｜▁pad▁｜>"
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
SPECIAL = (BOS, EOS, PAD, IMAGE, BOI, EOI, "<|User|>", "<|Assistant|>")
# Janus-Pro's conversation format (DeepSeek's "deepseek" sft format, empty system prompt) for generation prompts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}<image_placeholder>{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n\\n' }}{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer (no merges: 256 byte tokens) with Janus's special tokens after them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in SPECIAL:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                        special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left",
        model_max_length=16384,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|User|>", "<|Assistant|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    for tok in SPECIAL:
        if tokenizer.convert_tokens_to_ids(tok) != vocab[tok]:  # pragma: no cover - tokenizers behaviour guard
            raise RuntimeError(f"special token {tok!r} got id {tokenizer.convert_tokens_to_ids(tok)}, not {vocab[tok]}")
    return tokenizer


def _config(tokenizer):
    from transformers import JanusConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    vocab_size = -(-len(tokenizer) // 8) * 8
    text_config = {
        "model_type": "llama", "vocab_size": vocab_size, "hidden_size": HIDDEN, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": IMAGE_SIZE,
        "patch_size": PATCH, "projection_dim": HIDDEN, "mlp_ratio": 2.0, "depth": 1,
        "num_image_tokens": (IMAGE_SIZE // PATCH) ** 2,
    }
    vq_config = {
        "embed_dim": 8, "num_embeddings": CODEBOOK, "latent_channels": 32, "base_channels": 32,
        "channel_multiplier": [1, 1, 1, 1, 1], "num_res_blocks": 1, "projection_dim": HIDDEN,
        "image_token_embed_dim": HIDDEN, "num_hidden_layers": 2,
    }
    return JanusConfig(text_config=text_config, vision_config=vision_config, vq_config=vq_config,
                       image_token_id=ids[IMAGE], tie_word_embeddings=False), ids


def build_processor(tokenizer=None):
    from transformers import JanusImageProcessor, JanusProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image_processor = JanusImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                          num_image_tokens=(IMAGE_SIZE // PATCH) ** 2)


def build_janus(out_dir: Path) -> dict:
    """Write the tiny Janus-Pro (model + processor) into ``out_dir``."""
    from labelers import torch_compat

    torch_compat.install()
    import torch
    from transformers import GenerationConfig, JanusForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config, ids = _config(tokenizer)
    torch.manual_seed(SEED)
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():
        # A random N(0, 0.02) generation head gives a near-uniform token distribution; a wider one gives the tiny
        # model's sampler token preferences (like a trained model's) so GRPO has something to sharpen.
        model.model.generation_head.vision_head.weight.normal_(0.0, 0.5)
        # The VQ decoder's output conv at unit gain (N(0, 1/fan_in)) instead of N(0, 0.02): pixels then spread over
        # most of [-1, 1] and the token layout shows in the image (GroupNorm removes any global brightness offset).
        conv_out = model.model.vqmodel.decoder.conv_out
        conv_out.weight.normal_(0.0, conv_out.weight[0].numel() ** -0.5)
        conv_out.bias.zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=True, temperature=1.0,
        guidance_scale=5.0, generation_kwargs={"boi_token_id": ids[BOI]}, max_new_tokens=config.vision_config.num_image_tokens,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor(tokenizer).save_pretrained(out_dir)
    return {"image_tokens": config.vision_config.num_image_tokens, "codebook": CODEBOOK,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(build_janus(Path(sys.argv[1]))))
