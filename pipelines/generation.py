"""Batched, seeded image generation on any diffusers pipeline (the plumbing Dagster resources wrap).

One ``torch.Generator`` per request, seeded with the request's seed, draws that request's initial noise, so an
image depends on (model, params, text, seed[, source image]) and not on which other requests share its batch.
Models load once in :meth:`ImageGenerator.setup` through ``DiffusionPipeline.from_pretrained`` (zoo references
``zoo:<name>`` are resolved to local directories first), the same code path for the tiny zoo and real checkpoints.

No torch/diffusers import at module level: Dagster's ``definitions.py`` imports this module.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

logger = logging.getLogger(__name__)

from labelers.hashing import content_id

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

KINDS = ("t2i", "edit")
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class GenerationRequest:
    key: str  # the caller's id for the image (e.g. a candidate_id)
    text: str
    seed: int
    source_image: "PIL.Image.Image | None" = None  # the edit's source (or, for single-image models, a reference grid)
    reference_images: tuple = ()  # multi_ref references, passed natively to models that take several images


class ImageGenerator:
    """Loads a diffusers pipeline once and turns :class:`GenerationRequest` lists into PIL images.

    ``generator_id`` identifies the *results* (model reference, kind, sampling params, loaded LoRA), not the
    hardware: ``device`` and ``batch_size`` are left out of it.
    """

    def __init__(
        self,
        model: str,
        kind: str = "t2i",
        device: str = "cpu",
        dtype: str = "float32",
        steps: int = 8,
        guidance_scale: float = 5.0,
        image_guidance_scale: float = 1.5,
        width: int = 64,
        height: int = 64,
        batch_size: int = 8,
        negative_prompt: str | None = None,
        cpu_threads: int | None = None,
        reference_input: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if int(batch_size) < 1 or int(steps) < 1:
            raise ValueError("batch_size and steps must be >= 1")
        self.model = model
        self.kind = kind
        self.device = device
        self.dtype = _DTYPES[dtype]
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.image_guidance_scale = float(image_guidance_scale)
        self.width = int(width)
        self.height = int(height)
        self.batch_size = int(batch_size)
        self.negative_prompt = negative_prompt
        # torch intra-op threads for CPU runs (None: leave torch's default). Several processes each using every
        # core (e.g. parallel partitions on a small machine) slow each other down many times over: set it to
        # cores // processes there. Not part of generator_id.
        self.cpu_threads = cpu_threads
        # how multi_ref references reach the model: "native" (several input images) or "grid" (tiled into one
        # source image for single-image edit models); recorded in params, so in every candidate's row
        if reference_input not in (None, "native", "grid"):
            raise ValueError(f"reference_input must be 'native' or 'grid', got {reference_input!r}")
        self.reference_input = reference_input
        self._pipe: Any = None
        self._family: Any = None
        self._native = False  # True when the family samples itself (flow matching), see setup()
        self._ar = False  # True for an autoregressive family (Janus): VQ tokens sampled by the family, see setup()
        self._resize_reported: set[tuple[int, int]] = set()
        self._call_params: frozenset[str] = frozenset()
        self._lora: dict[str, str] | None = None

    # ------------------------------------------------------------------ identity
    @property
    def params(self) -> dict[str, Any]:
        """The sampling parameters (JSON-able), as stored with each candidate."""
        p: dict[str, Any] = {
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "negative_prompt": self.negative_prompt,
            "dtype": self.dtype,
        }
        if self.kind == "edit":
            p["image_guidance_scale"] = self.image_guidance_scale
        if self.reference_input is not None:
            p["reference_input"] = self.reference_input
        if self._lora is not None:
            p["lora_sha256"] = self._lora["sha256"]  # content, not path: a copied adapter keeps its id
        return p

    @property
    def generator_id(self) -> str:
        return content_id("generator", self.model, self.kind, self.params)

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_setup(self) -> bool:
        return self._pipe is not None

    def setup(self) -> None:
        """Load the pipeline once (idempotent)."""
        if self._pipe is not None:
            return
        import torch
        from diffusers import DiffusionPipeline

        from pipelines.zoo import resolve_model

        from trainers.families import AR_FAMILIES, FLOW_FAMILIES, load_family

        torch_dtype = getattr(torch, self.dtype)
        with _quiet_loading(), self._threads():
            family = load_family(resolve_model(self.model), dtype=torch_dtype)
        if family.name in AR_FAMILIES:
            # Autoregressive (Janus): the family samples VQ tokens, one seeded generator per request, classifier-free
            # guidance when guidance_scale > 1 (the checkpoint's unconditional prompt); `steps` does not apply.
            if self.kind != "t2i":
                raise ValueError(f"{self.model}: the {family.name} family generates from text only (kind t2i), "
                                 f"got kind {self.kind!r}")
            if self.negative_prompt is not None:
                raise ValueError(f"{self.model}: the {family.name} family takes no negative_prompt (its CFG branch "
                                 "is the checkpoint's padded prompt)")
            family.to(self.device)
            self._family, self._ar, self._pipe = family, True, family.model
            return
        pipe = family.pipe
        pipe = pipe.to(self.device)
        self._call_params = frozenset(inspect.signature(pipe.__call__).parameters)
        if self.kind == "edit" and "image" not in self._call_params:
            raise ValueError(f"{type(pipe).__name__} ({self.model}) takes no source image: not an edit pipeline")
        if family.name in FLOW_FAMILIES and self.width != self.height:
            raise ValueError(f"{self.model}: flow-matching families generate square images here; "
                             f"got width {self.width} != height {self.height}")
        # UNet families generate through their diffusers pipeline's __call__; flow-matching families through the
        # family's sampler (the Euler ODE of FlowMatchEulerDiscreteScheduler, the same components), which encodes
        # input images at the generated size and takes several natively (the edit pipelines resize each input to
        # ~1024² whatever the output, and FLUX Kontext's __call__ takes one).
        self._native = family.name in FLOW_FAMILIES
        self._family = family
        self._pipe = pipe

    def teardown(self) -> None:
        """Free the pipeline (and cached accelerator memory)."""
        if self._pipe is None:
            return
        device = str(self.device)
        self._pipe = None
        self._lora = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    @property
    def family(self) -> Any:
        if self._family is None:
            raise RuntimeError("ImageGenerator.setup() has not been called")
        return self._family

    @property
    def max_input_images(self) -> int:
        """Input images the model conditions on, from its ``model_index.json`` (no loading)."""
        from pipelines.zoo import resolve_model
        from trainers.families import input_images

        return input_images(resolve_model(self.model))

    @property
    def pipeline(self) -> Any:
        if self._pipe is None:
            raise RuntimeError("ImageGenerator.setup() has not been called")
        return self._pipe

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[GenerationRequest]) -> list["PIL.Image.Image"]:
        """One image per request, in order; processed in batches of ``batch_size``."""
        requests = list(requests)
        if not requests:
            return []
        self.setup()
        if self.kind == "edit" and (not self._native or self.family.needs_input_image):
            # pipeline edit models need an image; the flow families' edit models also generate from text alone
            missing = [r.key for r in requests if r.source_image is None and not r.reference_images]
            if missing:
                raise ValueError(f"edit generation needs a source_image or reference_images; missing for key(s): "
                                 f"{', '.join(missing)}")
        from labelers.oom import map_batches_with_oom_backoff

        def run(batch: list[GenerationRequest]) -> list[PIL.Image.Image]:
            # Pad the last batch to the full batch shape (copies of its last request, outputs dropped): float
            # kernels pick different code paths per tensor shape, so a fixed shape makes every image
            # bit-identical however the requests were grouped or ordered (e.g. a resumed partition).
            n = len(batch)
            return self._generate_batch(batch + [batch[-1]] * (self.batch_size - n))[:n]

        def shrink(old: int, new: int) -> None:
            # A CUDA out-of-memory error: go on at half the batch (images of a smaller batch shape may differ
            # in the last bits from a run that never ran out of memory).
            logger.warning(f"{self.model}: out of memory at batch {old}; continuing with batch {new}")
            self.batch_size = new

        with self._threads():
            images, _ = map_batches_with_oom_backoff(requests, self.batch_size, run, on_shrink=shrink)
        return images

    def _threads(self):
        """One block at ``cpu_threads`` torch threads on CPU (see ``labelers.torch_compat.torch_threads``)."""
        from labelers.torch_compat import torch_threads

        return torch_threads(self.cpu_threads if str(self.device).startswith("cpu") else None)

    def _generate_batch(self, batch: list[GenerationRequest]) -> list["PIL.Image.Image"]:
        import torch

        if self._native:
            return self._generate_native(batch)
        if self._ar:
            images = self.family.generate([r.text for r in batch], [r.seed for r in batch], self.guidance_scale)
            return self._to_requested_size(images)
        pipe = self.pipeline
        # Noise is drawn on the CPU from a CPU generator: identical initial latents on every device.
        generators = [torch.Generator(device="cpu").manual_seed(int(r.seed)) for r in batch]
        kwargs: dict[str, Any] = {
            "prompt": [r.text for r in batch],
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "generator": generators,
            "output_type": "pil",
        }
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(batch)
        if self.kind == "edit":
            kwargs["image"] = [self._prepare_source(r.source_image) for r in batch]
            kwargs["image_guidance_scale"] = self.image_guidance_scale
        # Different pipelines accept different subsets (InstructPix2Pix has no width/height, FLUX no negatives).
        kwargs = {k: v for k, v in kwargs.items() if k in self._call_params}
        with torch.inference_mode():
            out = pipe(**kwargs)
        images = [im.convert("RGB") for im in out.images]
        if len(images) != len(batch):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(batch)} requests")
        return self._to_requested_size(images)

    def _to_requested_size(self, images: list["PIL.Image.Image"]) -> list["PIL.Image.Image"]:
        """Images at the profile's width x height. A model that draws another size (Janus' fixed VQ grid, a
        pipeline without width/height arguments) is resized, and said once per size, not silently."""
        wanted = (self.width, self.height)
        for size in {im.size for im in images} - {wanted} - self._resize_reported:
            self._resize_reported.add(size)
            logger.warning("%s draws %dx%d images; resized to the requested %dx%d (set the generator's width and "
                           "height to the model's size to avoid it)", self.model, size[0], size[1], *wanted)
        return [im if im.size == wanted else im.resize(wanted) for im in images]

    def _generate_native(self, batch: list[GenerationRequest]) -> list["PIL.Image.Image"]:
        import torch

        from trainers.common import tensor_to_pil

        family, size = self.family, self.width
        images = []
        for r in batch:
            given = list(r.reference_images) or ([r.source_image] if r.source_image is not None else [])
            if len(given) > family.max_input_images:
                raise ValueError(f"{r.key}: {len(given)} input images but {family.pipeline_class} ({self.model}) "
                                 f"takes at most {family.max_input_images}")
            images.append([self._prepare_source(im) for im in given])
        images_arg = images if any(images) else None
        with torch.inference_mode():
            cond = family.encode([r.text for r in batch], images_arg, size)
            uncond = None
            if self.guidance_scale > 1.0:
                uncond = family.encode([self.negative_prompt or ""] * len(batch), images_arg, size)
            # noise drawn on the CPU per request from its seed, as the pipelines draw it
            noise = family.initial_noise([torch.Generator(device="cpu").manual_seed(int(r.seed)) for r in batch],
                                         size).to(family.device, family.denoiser.dtype)
            out = family.sample(cond, uncond, noise, self.steps, size, guidance=self.guidance_scale, eta=0.0)
            pixels = family.latents_to_images(out["latents"][-1], size).float()
        return tensor_to_pil(pixels)

    def _prepare_source(self, image: "PIL.Image.Image") -> "PIL.Image.Image":
        from PIL import Image

        image = image.convert("RGB")
        if image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), Image.Resampling.LANCZOS)
        return image

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, lora_dir: str) -> None:
        """Load a diffusers-format LoRA (``pytorch_lora_weights.safetensors``); replaces any loaded one."""
        pipe = self.pipeline
        if self._lora is not None:
            self.unload_lora()
        path = Path(lora_dir)
        if self._ar:  # a PEFT adapter (trainers.ar_grpo), through transformers' own load_adapter
            pipe.load_adapter(str(path), adapter_name="default")
        else:
            pipe.load_lora_weights(str(path))
        self._lora = {"path": str(path.resolve()) if path.exists() else str(lora_dir), "sha256": _dir_digest(path)}

    def unload_lora(self) -> None:
        if self._pipe is None or self._lora is None:
            self._lora = None
            return
        if self._ar:
            self._pipe.delete_adapter("default")
        else:
            self._pipe.unload_lora_weights()
        self._lora = None

    @property
    def lora(self) -> dict[str, str] | None:
        return dict(self._lora) if self._lora else None


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No loading progress bars, no ``torch_dtype`` rename warning (newer diffusers call it ``dtype``)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_off, t_off = not dlog.is_progress_bar_enabled(), not tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            yield
    finally:
        if not d_off:
            dlog.enable_progress_bar()
        if not t_off:
            tlog.enable_progress_bar()


def _dir_digest(path: Path) -> str:
    """sha256 over the LoRA weight files, so the generator_id follows the adapter's content, not its path."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.safetensors") if p.is_file()) if path.is_dir() else []
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest() if files else ""


__all__ = ["GenerationRequest", "ImageGenerator", "KINDS"]
