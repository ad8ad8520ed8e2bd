"""Tiny randomly initialised Qwen2.5-VL judge, saved in the layout of a real Qwen2.5-VL checkpoint.

``build_judge(out_dir)`` writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and an
``AutoProcessor``-loadable processor (``Qwen2VLImageProcessor`` + ``Qwen2Tokenizer`` + chat template) into
``out_dir``. Everything is built offline:

* the tokenizer is a byte-level BPE trained in memory with ``tokenizers`` on a small English + JSON corpus,
  with Qwen's pre-tokenizer, followed by Qwen's special tokens (``<|endoftext|>``, ``<|im_start|>``, …,
  ``<|image_pad|>``) in Qwen's order, so the ids in ``config.json`` match the tokenizer;
* the chat template is Qwen2.5-VL-Instruct's;
* the model is ``Qwen2_5_VLForConditionalGeneration`` from a small config with a fixed seed (≈0.4 M params).

The result reloads with ``AutoProcessor.from_pretrained(dir)`` and
``AutoModelForImageTextToText.from_pretrained(dir)`` exactly as a real checkpoint does, so the judge code
path is the production one. A random model emits garbage text: only grammar-constrained decoding makes it
produce valid judgements, which is what the tests rely on.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 1234
BPE_VOCAB_SIZE = 2048  # trained byte-level BPE tokens (incl. the 256 byte tokens)
MODEL_VOCAB_PAD = 64  # lm_head rows are padded to a multiple of this, as real Qwen checkpoints are

# Qwen2.5-VL's added tokens, in Qwen's id order (real ids start at 151643).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added but not special in Qwen's tokenizer (they survive skip_special_tokens).
NON_SPECIAL_ADDED = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2.5-VL-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenisation regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Pixel budget of the image processor: a 64x64 image becomes 56x56 -> 4x4 patches of 14 -> 4 tokens
# after the 2x2 merge; larger images are downscaled to at most 4 tokens, smaller ones upscaled to >= 1.
MIN_PIXELS = 28 * 28
MAX_PIXELS = 56 * 56

_ENGLISH = """\
You are an expert judge of images produced by generative models. Score the image on each dimension
from 0 (very poor) to 5 (excellent) and give one short sentence of feedback for each dimension.
Prompt alignment: does the image show every object, attribute, count and relation the prompt asks for?
Visual quality: is the image sharp, free of artifacts, distortions, extra limbs, blur and noise?
Aesthetics: composition, colour harmony, lighting and overall appeal of the picture.
Instruction following: did the edit do what the instruction asked, and only that?
Detail preservation: are the parts of the source image that the instruction did not mention unchanged?
Reference fidelity: does the subject, style, background or pose match the reference images?
A red cube on top of a blue sphere, photographed in soft morning light on a wooden table.
A watercolor painting of a fox in a snowy forest, with pine trees and a pale sky.
Replace the sky with a sunset, keep the buildings and the people as they are.
Make the dog wear a yellow raincoat. Put the cat from the first reference into the scene of the second.
The image matches the prompt well but the colours are washed out and the edges are blurry.
The subject is missing, the background is correct, the lighting is harsh and the face is distorted.
Good composition and pleasant colours; a few small artifacts near the border of the frame.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Return your answer as a single JSON object that follows the schema, with no other text.
"""

_JSON = """\
{"prompt_alignment": {"score": 4, "feedback": "The cube and the sphere are present and well placed."},
 "visual_quality": {"score": 3, "feedback": "Slight blur on the edges."},
 "aesthetics": {"score": 5, "feedback": "Pleasant colours and balanced composition."}}
{"instruction_following": {"score": 2, "feedback": "The sky changed but the people were removed."},
 "detail_preservation": {"score": 1, "feedback": "Buildings are distorted."},
 "visual_quality": {"score": 0, "feedback": "Heavy artifacts."}}
{"reference_fidelity": {"score": 3, "feedback": "The cat looks similar but its colour differs."}}
{"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 5},
 "feedback": {"type": "string", "maxLength": 120}}, "required": ["score", "feedback"],
 "additionalProperties": false}
[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0.5, 1.25, -3, true, false, null, "a", "b", {}, []]
"""


_WORDS = """
a an the and or but with without of on in under over behind beside near far above below between inside outside
red orange yellow green blue purple pink brown black white grey gray golden silver pale dark bright vivid muted
cat dog fox bird horse owl rabbit lion tiger bear fish dragon robot person woman man child girl boy face hand
house castle city street road bridge river lake sea ocean mountain forest tree flower garden field desert beach
sky cloud sun moon star rain snow fog storm night morning evening sunset sunrise light shadow reflection window
car bicycle boat train plane ship cup bottle chair table book lamp clock hat coat shoe bag guitar piano painting
photo photograph portrait landscape illustration sketch drawing render cartoon anime watercolor oil pencil pixel
cinematic realistic detailed sharp blurry noisy clean soft hard smooth rough glossy matte warm cold cozy calm
one two three four five six seven eight nine ten many few several both each every all none some
is are was were be been has have had does do did can could should would will may might must not no yes
image picture scene subject object background foreground style pose reference source edit instruction prompt
score feedback quality aesthetics alignment fidelity preservation following visual detail dimension rubric
good bad poor excellent fine great perfect weak strong slight heavy minor major missing extra wrong correct
color colour composition lighting contrast texture artifact artifacts distortion noise blur edge edges border
replace remove add change keep make turn put move place give show look match matches follows follow preserve
"""


def _corpus() -> list[str]:
    """A deterministic English + JSON training corpus (a few thousand lines, built from the snippets above)."""
    import random

    rng = random.Random(SEED)
    words = _WORDS.split()
    lines = [line for line in (_ENGLISH + _JSON).splitlines() if line.strip()] * 8
    for _ in range(3000):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + ".")
    for _ in range(600):
        dims = rng.sample(
            ["prompt_alignment", "visual_quality", "aesthetics", "instruction_following",
             "detail_preservation", "reference_fidelity"], 3)
        obj = {
            d: {"score": rng.randint(0, 5), "feedback": " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))}
            for d in dims
        }
        lines.append(json.dumps(obj, separators=(",", ":") if rng.random() < 0.5 else (", ", ": ")))
    return lines


def _train_bpe():
    """Train a byte-level BPE with Qwen2's pre-tokenizer; returns (vocab, merges) with Qwen's added tokens
    appended to the vocab after the BPE tokens, in Qwen's order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model_json = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model_json["vocab"].items(), key=lambda kv: kv[1]))
    if sorted(vocab.values()) != list(range(len(vocab))):  # pragma: no cover
        raise RuntimeError("trained BPE vocab ids are not contiguous")
    for token in SPECIAL_TOKENS + NON_SPECIAL_ADDED:
        vocab[token] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    return vocab, merges


def build_tokenizer():
    """The offline Qwen2 tokenizer (a ``transformers.Qwen2Tokenizer``) with Qwen's added tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED])
    tokenizer.chat_template = CHAT_TEMPLATE
    for token in SPECIAL_TOKENS + NON_SPECIAL_ADDED:
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:  # pragma: no cover - tokenizers behaviour guard
            raise RuntimeError(f"added token {token!r} got id {tokenizer.convert_tokens_to_ids(token)}, not {vocab[token]}")
    if len(tokenizer) != len(vocab):  # pragma: no cover
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def _model_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // MODEL_VOCAB_PAD) * MODEL_VOCAB_PAD
    hidden = 64
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "max_window_layers": 2,
        # head_dim = 16 -> 8 rotary frequencies split over (temporal, height, width) as Qwen does (16, 24, 24).
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": hidden,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer=None):
    """``Qwen2_5_VLProcessor`` with a pixel budget that keeps 64x64 images to a handful of tokens."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    video_processor = None
    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(
            size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
        )
    except Exception:  # pragma: no cover - video processing needs torchvision's video stack
        video_processor = None
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_judge(out_dir: Path) -> None:
    """Write a tiny random Qwen2.5-VL judge (model + processor) into ``out_dir`` (created if missing)."""
    from labelers import torch_compat

    torch_compat.install()
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = _model_config(tokenizer)

    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
