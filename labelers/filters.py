"""Filters that say why: every filter returns ``(True, None)`` to keep an item or ``(False, reason)`` to drop it,
and the caller counts drops by reason (a ``collections.Counter``; see :func:`apply` and :func:`count_drops`) for
the asset's metadata and the corpus manifest.

Small steps with one job each (datatrove style):

* :func:`check_image`: the image decodes fully and its short side is at least ``min_side``
  (``undecodable_image``, ``undersized_image``).
* :class:`NearDuplicateFilter`: exact duplicates (sha256), perceptual-hash near duplicates (hamming distance of
  64-bit pHashes, :func:`perceptual_hash`, :func:`hamming_distance`) and CLIP near duplicates (embedding cosine,
  blocked matmul) — ``exact_duplicate``, ``near_duplicate_phash``, ``near_duplicate_clip``. Keeps the first
  occurrence, in the order items are given. Brute force by default; ``exact=False`` looks the kept memory up
  through indexes (:mod:`labelers.dedup_index`: exact multi-index hashing for pHash, faiss IVF for CLIP).
* :func:`judge_failure`, :func:`reward_at_least`: label rows whose judgement failed (``label_<status>``,
  ``missing_reward``) or whose reward is below the SFT threshold (``below_reward_threshold``).
* :class:`NsfwClassifier`: an optional image classifier (``AutoModelForImageClassification``), loaded lazily in
  ``setup()``; ``process_batch`` gives NSFW probabilities, ``filter_batch`` the verdicts (``nsfw``).

Single-item filters are callables ``item -> (keep, reason)``; batch filters (near duplicates, NSFW) take a batch
and return one ``(keep, reason)`` per item. numpy only at import; PIL, imagehash, torch and transformers load
inside the functions that need them. Never imports Dagster.

One module (over ~500 lines) on purpose: the filters share one drop-reason contract and the counting base; splitting them would scatter that contract.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Verdict = tuple[bool, "str | None"]
Filter = Callable[[Any], Verdict]

KEEP: Verdict = (True, None)

UNDECODABLE_IMAGE = "undecodable_image"
UNDERSIZED_IMAGE = "undersized_image"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE_PHASH = "near_duplicate_phash"
NEAR_DUPLICATE_CLIP = "near_duplicate_clip"
MISSING_REWARD = "missing_reward"
BELOW_REWARD_THRESHOLD = "below_reward_threshold"
NSFW = "nsfw"

DEFAULT_NSFW_LABELS = ("nsfw", "porn", "hentai", "sexy")

_U64_MASK = (1 << 64) - 1
_MAX_TILE = 1 << 22  # elements per temporary distance / similarity tile (16 MiB of float32, 32 MiB of uint64)


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------
def apply(filters: Iterable[Filter], item: Any, counter: Counter | None = None) -> bool:
    """Run ``filters`` on ``item`` in order; on the first drop, count its reason in ``counter`` and return False
    (later filters do not run). True when every filter keeps the item."""
    for f in filters:
        keep, reason = f(item)
        if not keep:
            if counter is not None:
                counter[reason or "unspecified"] += 1
            return False
    return True


def count_drops(verdicts: Iterable[Verdict], counter: Counter | None = None) -> list[bool]:
    """Keep mask of a batch filter's verdicts, counting each drop's reason in ``counter``."""
    mask = []
    for keep, reason in verdicts:
        if not keep and counter is not None:
            counter[reason or "unspecified"] += 1
        mask.append(bool(keep))
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
def _decode(data: Any):
    """A fully decoded PIL image from encoded bytes or a PIL image (``load()`` forces the pixel data)."""
    from PIL import Image

    if isinstance(data, Image.Image):
        data.load()
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
        return img
    raise TypeError(f"expected encoded image bytes or a PIL image, got {type(data).__name__}")


def check_image(data: Any, min_side: int) -> Verdict:
    """Keep an image that decodes completely (PIL, ``load()``: truncated or corrupt data fails here, not later)
    and whose shorter side is at least ``min_side`` pixels (``min_side <= 0``: any size).

    ``data``: encoded bytes or a PIL image. Note that PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES = True``
    (if anything in the process sets it) makes PIL pad truncated files instead of failing.
    """
    if data is None:
        return False, UNDECODABLE_IMAGE
    try:
        img = _decode(data)
        width, height = img.size
    except Exception:  # noqa: BLE001 - any decoding failure (OSError, SyntaxError, DecompressionBombError, ...)
        return False, UNDECODABLE_IMAGE
    if width <= 0 or height <= 0 or min(width, height) < int(min_side):
        return False, UNDERSIZED_IMAGE
    return KEEP


def perceptual_hash(image: Any) -> int:
    """64-bit DCT perceptual hash (``imagehash.phash``, hash_size 8) of a PIL image or encoded bytes, as an
    unsigned int (fits ``np.uint64``; bit 63 is the first bit of ``imagehash``'s row-major hash).
    Hamming distance between two hashes equals ``imagehash``'s ``h1 - h2``."""
    import imagehash

    img = _decode(image)
    bits = np.asarray(imagehash.phash(img, hash_size=8).hash, dtype=bool).reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def as_phash_array(hashes: Any) -> np.ndarray:
    """``np.uint64`` array from pHashes given as Python ints (unsigned, or signed int64 as a store may keep them),
    16-digit hex strings, or an integer numpy array (int64 is reinterpreted, not converted)."""
    if isinstance(hashes, np.ndarray):
        if hashes.dtype == np.uint64:
            return hashes.reshape(-1)
        if hashes.dtype == np.int64:
            return hashes.reshape(-1).view(np.uint64)
        if np.issubdtype(hashes.dtype, np.integer):
            return hashes.reshape(-1).astype(np.uint64)
        hashes = hashes.tolist()
    out = [(int(h, 16) if isinstance(h, str) else int(h)) & _U64_MASK for h in hashes]
    return np.array(out, dtype=np.uint64)


if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def popcount64(x: np.ndarray) -> np.ndarray:
        """Number of set bits of each element of a uint64 array (uint8 result)."""
        return np.bitwise_count(np.asarray(x, dtype=np.uint64))

else:  # pragma: no cover - numpy < 2.0
    _POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def popcount64(x: np.ndarray) -> np.ndarray:
        """Number of set bits of each element of a uint64 array (uint8 result; byte lookup table)."""
        x = np.ascontiguousarray(x, dtype=np.uint64)
        return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming_distance(a: Any, b: Any) -> np.ndarray:
    """Elementwise (broadcasting) hamming distance of 64-bit hashes; ``hamming_distance(a[:, None], b[None, :])``
    is the pairwise matrix. Inputs as :func:`as_phash_array` accepts (numpy arrays keep their shape)."""
    a = a if isinstance(a, np.ndarray) and a.dtype == np.uint64 else _phash_nd(a)
    b = b if isinstance(b, np.ndarray) and b.dtype == np.uint64 else _phash_nd(b)
    return popcount64(np.bitwise_xor(a, b))


def _phash_nd(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return as_phash_array(x).reshape(x.shape)
    if isinstance(x, (int, np.integer, str)):
        return as_phash_array([x]).reshape(())
    return as_phash_array(list(x))


# ----------------------------------------------------------------------------------------------------------------
# Near duplicates
# ----------------------------------------------------------------------------------------------------------------
def _as_embeddings(x: Any) -> np.ndarray:
    """(N, D) L2-normalised float32 (zero vectors stay zero: cosine 0 with everything)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    x = np.array(x, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class _Rows:
    """A growable array of rows (amortised O(1) append)."""

    def __init__(self, dtype: Any):
        self.dtype = dtype
        self._buf: np.ndarray | None = None
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        if self._buf is None:
            shape = (max(16, len(rows)),) + rows.shape[1:]
            self._buf = np.empty(shape, dtype=self.dtype)
        elif rows.shape[1:] != self._buf.shape[1:]:
            raise ValueError(f"row shape {rows.shape[1:]} does not match the stored {self._buf.shape[1:]}")
        need = self.n + len(rows)
        if need > len(self._buf):
            grown = np.empty((max(need, 2 * len(self._buf)),) + self._buf.shape[1:], dtype=self.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = rows
        self.n = need

    def view(self) -> np.ndarray:
        return self._buf[: self.n] if self._buf is not None else np.empty((0,), dtype=self.dtype)


class NearDuplicateFilter:
    """Drop exact and near duplicates, keeping the first occurrence in the order items are given.

    Order-defined and incremental: an item is dropped when it duplicates an item *kept* before it — in an earlier
    batch, earlier in the same batch, or seeded with :meth:`add_kept`. Checks, first match wins:

    * ``exact_duplicate``: its sha256 equals that of any item seen before (kept or dropped: bytes identical to a
      dropped item duplicate whatever that item duplicated). Per-item ``None`` sha256s are skipped.
    * ``near_duplicate_phash``: hamming distance of 64-bit pHashes ``<= phash_max_distance`` to a kept item.
    * ``near_duplicate_clip``: cosine of L2-normalised float32 embeddings ``>= cosine_threshold`` to a kept item.

    ``None`` for a threshold disables that check; ``None`` for a batch's sha256s / phashes / embeddings skips that
    check for the batch (and those items add nothing to that check's memory). The within-batch greedy is exact:
    with A~B, B~C and A≁C, B is dropped and C kept (C is compared only with *kept* items).

    Implementation: a batch is processed in blocks of ``block_size`` rows. Each block is compared with the kept
    memory (which already holds the kept items of earlier blocks) in tiles of at most ``block_size`` memory rows
    (and at most ~4M elements: cosine tiles are a float32 matmul, pHash tiles XOR + popcount), then within itself
    (a ``block × block`` boolean matrix), then resolved greedily in order; its kept items join the memory. No
    ``N × N`` matrix over the set is ever built, and the result does not depend on ``block_size``.

    Complexity (``exact=True``, the default): a batch of ``B`` items against ``K`` kept items costs
    ``O(B·(K + B)·D)`` flops for cosine and ``O(B·(K + B))`` word operations for pHash (brute force), so a whole
    set of ``N`` items is ``O(N²·D)``. Extra memory: ``O(block_size²)`` temporaries; state: ``4·D + 8`` bytes per
    kept item plus every seen sha256 and kept key.

    ``exact=False`` (issue 15, :mod:`labelers.dedup_index`): the comparison with the kept memory goes through
    indexes, the within-block comparison and the greedy stay as above (``block_size`` defaults to 1024 there).
    pHash: multi-index hashing, still exact (identical verdicts). Cosine: brute force while fewer than
    ``ann_min_items`` items are kept, then a faiss IVF index (``ann_list_size`` rows per list, ``ann_nprobe``
    lists searched), roughly constant work per item: a whole set is about ``O(N log N)``. It can *miss* a near
    duplicate (keep an item the exact path drops; it never drops one the exact path keeps, except downstream of
    such a miss), at the recall ``bench/dedup.py`` measures. ``add_kept`` only appends rows; the indexes are
    (re)built from them on the next batch in linear time.
    """

    def __init__(self, phash_max_distance: int | None = None, cosine_threshold: float | None = None,
                 block_size: int | None = None, exact: bool = True, ann_min_items: int = 4096,
                 ann_list_size: int = 256, ann_nprobe: int = 8):
        if phash_max_distance is not None and not 0 <= int(phash_max_distance) <= 64:
            raise ValueError(f"phash_max_distance must be in [0, 64], got {phash_max_distance}")
        if cosine_threshold is not None and not -1.0 <= float(cosine_threshold) <= 1.0:
            raise ValueError(f"cosine_threshold must be in [-1, 1], got {cosine_threshold}")
        if block_size is None:
            block_size = 4096 if exact else 1024
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.phash_max_distance = None if phash_max_distance is None else int(phash_max_distance)
        self.cosine_threshold = None if cosine_threshold is None else float(cosine_threshold)
        self.block_size = int(block_size)
        self.exact = bool(exact)
        self._phash_index = self._clip_index = None
        if not self.exact:
            from labelers.dedup_index import ClipIndex, PHashIndex

            if self.phash_max_distance is not None:
                index = PHashIndex(self.phash_max_distance)
                self._phash_index = index if index.worthwhile else None  # wide radii: brute force is as good
            if self.cosine_threshold is not None:
                self._clip_index = ClipIndex(self.cosine_threshold, min_items=ann_min_items,
                                             list_size=ann_list_size, nprobe=ann_nprobe)
        self._seen_sha: set[str] = set()
        self._phashes = _Rows(np.uint64)
        self._embeddings = _Rows(np.float32)
        self.kept_keys: list[Any] = []

    def __len__(self) -> int:
        """Number of kept items (including those seeded with :meth:`add_kept`)."""
        return len(self.kept_keys)

    # -- inputs ------------------------------------------------------------------------------------------------
    def _inputs(self, keys: Sequence[Any], sha256s: Sequence[str | None] | None, phashes: Any,
                embeddings: Any) -> tuple[list, list | None, np.ndarray | None, np.ndarray | None]:
        keys = list(keys)
        n = len(keys)
        if sha256s is not None:
            sha256s = list(sha256s)
        ph = as_phash_array(phashes) if phashes is not None and self.phash_max_distance is not None else None
        emb = _as_embeddings(embeddings) if embeddings is not None and self.cosine_threshold is not None else None
        for name, value in (("sha256s", sha256s), ("phashes", ph), ("embeddings", emb)):
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} keys")
        if emb is not None and self._embeddings.n and emb.shape[1] != self._embeddings.view().shape[1]:
            raise ValueError(f"embedding width {emb.shape[1]} differs from the kept "
                             f"embeddings' {self._embeddings.view().shape[1]}")
        return keys, sha256s, ph, emb

    # -- memory ------------------------------------------------------------------------------------------------
    def add_kept(self, keys: Sequence[Any], sha256s: Sequence[str | None] | None = None, phashes: Any = None,
                 embeddings: Any = None) -> None:
        """Seed the memory with items kept earlier (e.g. the previous corpus version), without filtering them."""
        keys, sha256s, ph, emb = self._inputs(keys, sha256s, phashes, embeddings)
        if sha256s is not None:
            self._seen_sha.update(s for s in sha256s if s is not None)
        if ph is not None:
            self._phashes.append(ph)
        if emb is not None:
            self._embeddings.append(emb)
        self.kept_keys.extend(keys)

    # -- filtering ---------------------------------------------------------------------------------------------
    def filter_batch(self, keys: Sequence[Any], sha256s: Sequence[str | None] | None = None, phashes: Any = None,
                     embeddings: Any = None) -> list[Verdict]:
        """One ``(keep, reason)`` per item, in order; kept items join the memory for later items and batches."""
        keys, sha256s, ph, emb = self._inputs(keys, sha256s, phashes, embeddings)
        n = len(keys)
        verdicts: list[Verdict] = [KEEP] * n

        exact = np.zeros(n, dtype=bool)
        if sha256s is not None:  # seen-before semantics: independent of the keep decisions, so resolved first
            for i, sha in enumerate(sha256s):
                if sha is None:
                    continue
                if sha in self._seen_sha:
                    exact[i] = True
                else:
                    self._seen_sha.add(sha)

        for start in range(0, n, self.block_size):
            stop = min(n, start + self.block_size)
            block_exact = exact[start:stop]
            m = stop - start
            live = np.flatnonzero(~block_exact)  # rows that may still be kept
            ph_hits = self._phash_hits(ph[start:stop], live) if ph is not None else None
            cl_hits = self._clip_hits(emb[start:stop], live) if emb is not None else None

            kept = np.zeros(m, dtype=bool)
            for j in range(m):
                if block_exact[j]:
                    verdicts[start + j] = (False, EXACT_DUPLICATE)
                elif ph_hits is not None and _near_kept(j, ph_hits, kept):
                    verdicts[start + j] = (False, NEAR_DUPLICATE_PHASH)
                elif cl_hits is not None and _near_kept(j, cl_hits, kept):
                    verdicts[start + j] = (False, NEAR_DUPLICATE_CLIP)
                else:
                    kept[j] = True

            if ph is not None:
                self._phashes.append(ph[start:stop][kept])
            if emb is not None:
                self._embeddings.append(emb[start:stop][kept])
            self.kept_keys.extend(keys[start + j] for j in np.flatnonzero(kept))
        return verdicts

    def _phash_hits(self, block: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = self.phash_max_distance

        def near(q: np.ndarray, r: np.ndarray) -> np.ndarray:
            return popcount64(np.bitwise_xor(q[:, None], r[None, :])) <= t

        memory = self._phashes.view()
        mem_hit = None
        if self._phash_index is not None:
            mem_hit = np.zeros(len(block), dtype=bool)
            mem_hit[live] = self._phash_index.hits(block[live], memory)
        return self._hits(block, live, memory, near, mem_hit)

    def _clip_hits(self, block: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = np.float32(self.cosine_threshold)

        def near(q: np.ndarray, r: np.ndarray) -> np.ndarray:
            return (q @ r.T) >= t

        memory = self._embeddings.view()
        mem_hit = None
        if self._clip_index is not None and len(memory):
            found = self._clip_index.hits(block[live], memory)  # None: too few kept rows, compare exactly
            if found is not None:
                mem_hit = np.zeros(len(block), dtype=bool)
                mem_hit[live] = found
        return self._hits(block, live, memory, near, mem_hit)

    def _hits(self, block: np.ndarray, live: np.ndarray, memory: np.ndarray,
              near: Callable[[np.ndarray, np.ndarray], np.ndarray],
              mem_hit: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the ``live`` rows of a block: (hits a kept memory item, strictly lower-triangular within-block near
        matrix, whether each row has any earlier near row). ``mem_hit`` given (an index answered): the memory
        is not scanned."""
        m = len(block)
        scan = mem_hit is None
        if scan:
            mem_hit = np.zeros(m, dtype=bool)
        for r0 in range(0, len(memory) if scan else 0, self.block_size):
            todo = live[~mem_hit[live]]  # rows already matched need no more work
            if len(todo) == 0:
                break
            ref = memory[r0 : r0 + self.block_size]
            rows = max(1, _MAX_TILE // len(ref))
            for q0 in range(0, len(todo), rows):
                idx = todo[q0 : q0 + rows]
                mem_hit[idx] = near(block[idx], ref).any(axis=1)

        pairs = np.zeros((m, m), dtype=bool)
        cand = live[~mem_hit[live]]
        if len(cand) > 1:
            ref = block[cand]
            rows = max(1, _MAX_TILE // len(cand))
            for q0 in range(0, len(cand), rows):
                idx = cand[q0 : q0 + rows]
                pairs[np.ix_(idx, cand)] = near(block[idx], ref)
            pairs = np.tril(pairs, k=-1)
        return mem_hit, pairs, pairs.any(axis=1)


def _near_kept(j: int, hits: tuple[np.ndarray, np.ndarray, np.ndarray], kept: np.ndarray) -> bool:
    """Row ``j`` is near a kept memory item, or near an earlier row of its block that was kept."""
    mem_hit, pairs, row_any = hits
    return bool(mem_hit[j]) or (bool(row_any[j]) and bool(np.any(pairs[j, :j] & kept[:j])))


# ----------------------------------------------------------------------------------------------------------------
# Label rows
# ----------------------------------------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    """No usable reward: null, NaN or ±inf (a label row with a non-finite reward is ``reward_error``; an ``ok`` one
    holding one breaks the contract, and is never ranked as the best or worst)."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def judge_failure(row: Mapping[str, Any]) -> Verdict:
    """Drop a label row whose judgement failed (``label_<status>`` for a status other than ``ok``, e.g.
    ``label_parse_error``, ``label_reward_error``) or that has no reward (``missing_reward``: null, NaN or ±inf)."""
    status = row.get("status")
    if status != "ok":
        return False, f"label_{status or 'missing_status'}"
    if _missing(row.get("reward")):
        return False, MISSING_REWARD
    return KEEP


def reward_at_least(threshold: float) -> Filter:
    """A filter keeping label rows with ``reward >= threshold`` (``below_reward_threshold``; ``missing_reward``
    for a null, NaN or infinite reward)."""
    threshold = float(threshold)

    def reward_filter(row: Mapping[str, Any]) -> Verdict:
        reward = row.get("reward")
        if _missing(reward):
            return False, MISSING_REWARD
        return KEEP if float(reward) >= threshold else (False, BELOW_REWARD_THRESHOLD)

    reward_filter.__name__ = f"reward_at_least_{threshold:g}"
    return reward_filter


# ----------------------------------------------------------------------------------------------------------------
# NSFW classifier
# ----------------------------------------------------------------------------------------------------------------
class NsfwClassifier:
    """An image classifier (``AutoModelForImageClassification`` + ``AutoImageProcessor``) as an NSFW filter.

    ``model``: a local directory, a ``zoo:`` reference or a hub id (``from_pretrained`` resolves it; offline
    environments only find what is cached). Loaded lazily on the first :meth:`process_batch` (or an explicit
    :meth:`setup`). The NSFW probability of an image is the softmax mass on the labels of ``config.id2label``
    whose lowercased name is in ``nsfw_labels``; an image is dropped (``nsfw``) when it is ``>= threshold``.
    """

    def __init__(self, model: str, threshold: float = 0.5, nsfw_labels: Sequence[str] = DEFAULT_NSFW_LABELS,
                 device: str = "cpu", batch_size: int = 32):
        self.model_name = str(model)
        self.threshold = float(threshold)
        self.nsfw_labels = tuple(str(label).lower() for label in nsfw_labels)
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.model = None
        self.processor = None
        self.label_indices: list[int] = []

    def setup(self) -> NsfwClassifier:
        if self.model is not None:
            return self
        from labelers import torch_compat

        torch_compat.install()
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from pipelines.zoo import resolve_model

        path = resolve_model(self.model_name)
        model = AutoModelForImageClassification.from_pretrained(path)
        id2label = {int(i): str(name) for i, name in model.config.id2label.items()}
        indices = sorted(i for i, name in id2label.items() if name.lower() in self.nsfw_labels)
        if not indices:
            raise ValueError(
                f"NSFW classifier {self.model_name!r} has none of the labels {list(self.nsfw_labels)} "
                f"(its labels: {[id2label[i] for i in sorted(id2label)]}); pass nsfw_labels naming its NSFW classes"
            )
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = model.to(self.device).eval()
        self.label_indices = indices
        return self

    def teardown(self) -> None:
        self.model = self.processor = None
        self.label_indices = []

    def process_batch(self, images: Sequence[Any]) -> list[float]:
        """NSFW probability in [0, 1] of each image (PIL images or encoded bytes; run :func:`check_image` first)."""
        self.setup()
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                chunk = [_decode(img).convert("RGB") for img in images[i : i + self.batch_size]]
                inputs = self.processor(images=chunk, return_tensors="pt")
                pixel_values = inputs["pixel_values"].to(device=self.device, dtype=self.model.dtype)
                logits = self.model(pixel_values=pixel_values).logits.float()
                probs = torch.softmax(logits, dim=-1)[:, self.label_indices].sum(dim=-1).clamp_(0.0, 1.0)
                out.extend(probs.cpu().tolist())
        return out

    def filter_batch(self, images: Sequence[Any]) -> list[Verdict]:
        return [KEEP if p < self.threshold else (False, NSFW) for p in self.process_batch(images)]
