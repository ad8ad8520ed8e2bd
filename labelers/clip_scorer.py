"""CLIP similarity scorer: CLIP_T (image ↔ prompt) and CLIP_I (image ↔ each reference image).

Two backends behind one interface:

* ``open_clip``: ``model`` is ``zoo:clip``, ``local-dir:/path`` / ``hf-hub:org/repo`` (HPSv2-style checkpoints), a local
  directory in open_clip's HF layout (``open_clip_config.json`` + weights; the zoo's ``clip``), or a built-in
  architecture name with ``pretrained`` (a tag or a weights file);
* ``transformers``: a ``CLIPModel``-compatible directory or hub id (e.g. PickScore) via ``AutoModel`` +
  ``AutoProcessor``.

The model is loaded once in ``setup()``; embeddings are computed batched under ``no_grad`` and L2-normalised, so
similarities are cosines in [-1, 1]. ``score`` embeds each distinct text and each distinct reference image once
(references are usually shared by all candidates of a prompt) in one batched pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelers.hashing import content_id
from labelers.torch_compat import torch_threads

_SCHEMES = ("local-dir:", "hf-hub:")


def _resolve(ref: str) -> str:
    from pipelines.zoo import resolve_model  # the one model-reference resolver (zoo:<name> -> its directory)

    return resolve_model(ref)


@dataclass
class ClipScores:
    clip_t: float
    clip_i: float | None = None  # mean over references; None without references
    clip_i_per_ref: list[float] = field(default_factory=list)


class ClipScorer:
    def __init__(
        self,
        model: str,
        backend: str = "open_clip",
        device: str = "cpu",
        batch_size: int = 32,
        pretrained: str | None = None,
        dtype: str = "float32",
        model_ref: str | None = None,
        cpu_threads: int | None = None,
    ):
        if backend not in ("open_clip", "transformers"):
            raise ValueError(f"unknown CLIP backend {backend!r} (open_clip | transformers)")
        self.model_name = str(model)
        self.model_ref = str(model_ref or model)
        self.backend = backend
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.pretrained = pretrained
        self.dtype = dtype
        self.cpu_threads = cpu_threads  # torch intra-op threads while embedding (None: unchanged)
        self.model = None
        self._preprocess = None
        self._tokenizer = None
        self._processor = None

    @property
    def scorer_id(self) -> str:
        return content_id("clip", self.backend, self.model_ref, self.pretrained)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def open_clip_name(self) -> tuple[str, str | None]:
        """(model name for open_clip's factory, pretrained) for ``self.model_name``."""
        name = _resolve(self.model_name)
        if name.startswith(_SCHEMES):
            return name, None
        if Path(name).is_dir():
            return "local-dir:" + str(Path(name).resolve()), None
        import open_clip

        if name in open_clip.list_models():
            return name, self.pretrained
        raise ValueError(
            f"open_clip model {name!r} is neither a 'local-dir:'/'hf-hub:' reference, an existing directory, "
            "nor a built-in architecture name"
        )

    def setup(self) -> ClipScorer:
        if self.model is not None:
            return self
        from labelers import torch_compat

        torch_compat.install()
        import torch

        if self.backend == "open_clip":
            import open_clip

            name, pretrained = self.open_clip_name()
            precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(self.dtype, self.dtype)
            model, preprocess = open_clip.create_model_from_pretrained(
                name, pretrained=pretrained, device=self.device, precision=precision
            )
            self._preprocess = preprocess
            self._tokenizer = open_clip.get_tokenizer(name)
        else:
            from transformers import AutoModel, AutoProcessor

            path = _resolve(self.model_name)
            model = AutoModel.from_pretrained(path, dtype=getattr(torch, self.dtype)).to(self.device)
            self._processor = AutoProcessor.from_pretrained(path)
        self.model = model.eval()
        return self

    def teardown(self) -> None:
        self.model = None
        self._preprocess = self._tokenizer = self._processor = None

    def _require(self) -> None:
        if self.model is None:
            raise RuntimeError("ClipScorer.setup() was not called")

    # -- embeddings ------------------------------------------------------------------------------------------
    @staticmethod
    def _features(out: Any):
        import torch

        if isinstance(out, torch.Tensor):
            return out
        for attr in ("pooler_output", "image_embeds", "text_embeds"):
            value = getattr(out, attr, None)
            if isinstance(value, torch.Tensor):
                return value
        raise TypeError(f"cannot find embeddings in {type(out).__name__}")

    def embed_images(self, images: Sequence[Any]):
        """L2-normalised image embeddings, shape (N, D), float32 on CPU."""
        self._require()
        import torch
        import torch.nn.functional as F

        chunks = []
        with torch.no_grad(), torch_threads(self.cpu_threads):
            for i in range(0, len(images), self.batch_size):
                batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
                if self.backend == "open_clip":
                    pixels = torch.stack([self._preprocess(im) for im in batch])
                    feats = self.model.encode_image(pixels.to(self.device, self._param_dtype()))
                else:
                    inputs = self._processor(images=batch, return_tensors="pt")
                    pixels = inputs["pixel_values"].to(self.device, self._param_dtype())
                    feats = self._features(self.model.get_image_features(pixel_values=pixels))
                chunks.append(F.normalize(feats.float(), dim=-1).cpu())
        if not chunks:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32)
        return torch.cat(chunks)

    def embed_texts(self, texts: Sequence[str]):
        """L2-normalised text embeddings, shape (N, D), float32 on CPU."""
        self._require()
        import torch
        import torch.nn.functional as F

        chunks = []
        with torch.no_grad(), torch_threads(self.cpu_threads):
            for i in range(0, len(texts), self.batch_size):
                batch = [str(t) for t in texts[i : i + self.batch_size]]
                if self.backend == "open_clip":
                    tokens = self._tokenizer(batch).to(self.device)
                    feats = self.model.encode_text(tokens)
                else:
                    inputs = self._processor(text=batch, padding=True, truncation=True, return_tensors="pt")
                    inputs = {k: v.to(self.device) for k, v in inputs.items()}
                    feats = self._features(self.model.get_text_features(**inputs))
                chunks.append(F.normalize(feats.float(), dim=-1).cpu())
        if not chunks:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32)
        return torch.cat(chunks)

    def _param_dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        self._require()
        if self.backend == "open_clip":
            return int(self.model.visual.output_dim)
        return int(self.model.config.projection_dim)

    # -- scores ----------------------------------------------------------------------------------------------
    def score(
        self,
        images: Sequence[Any],
        texts: Sequence[str],
        references: Sequence[Sequence[Any]] | None = None,
    ) -> list[ClipScores]:
        """Per image: cosine to its text (CLIP_T) and to each of its references (CLIP_I per reference, mean).

        Distinct texts and distinct reference images (by identity) are embedded once, all in batched passes.
        """
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        references = [list(r or ()) for r in (references if references is not None else [()] * len(images))]
        if len(references) != len(images):
            raise ValueError(f"{len(images)} images but {len(references)} reference lists")
        if not images:
            return []
        img = self.embed_images(list(images))

        text_index: dict[str, int] = {}
        for t in texts:
            text_index.setdefault(str(t), len(text_index))
        txt = self.embed_texts(list(text_index))
        clip_t = (img * txt[[text_index[str(t)] for t in texts]]).sum(dim=-1).tolist()

        ref_index: dict[int, int] = {}
        unique_refs: list[Any] = []
        for refs in references:
            for r in refs:
                if id(r) not in ref_index:
                    ref_index[id(r)] = len(unique_refs)
                    unique_refs.append(r)
        ref_emb = self.embed_images(unique_refs) if unique_refs else None

        out = []
        for i, refs in enumerate(references):
            if refs and ref_emb is not None:
                sims = (ref_emb[[ref_index[id(r)] for r in refs]] @ img[i]).tolist()
                out.append(ClipScores(clip_t=float(clip_t[i]), clip_i=float(sum(sims) / len(sims)),
                                      clip_i_per_ref=[float(s) for s in sims]))
            else:
                out.append(ClipScores(clip_t=float(clip_t[i])))
        return out
