"""What goes into each corpus, one input partition at a time (the :class:`pipelines.corpora.PartitionSource`s).

Every row that does not make it is counted by reason (``drops``); the reasons end up per partition in the
manifest's ``segments`` and summed in its ``drops`` and in the asset's metadata:

* SFT (``jpg, txt, json`` + ``src.jpg``, ``ref_K.jpg`` for edit / multi_ref): ``heldout_prompt``, ``label_<status>`` (judge failures:
  ``label_parse_error``, ``label_image_error``; ``label_reward_error``: a NaN / inf among the rewards),
  ``missing_reward``,
  ``below_reward_threshold`` (under the partition's ``sft_min_reward_quantile``), ``undecodable_image``,
  ``undersized_image``, ``nsfw``, ``exact_duplicate``, ``near_duplicate_phash``, ``near_duplicate_clip`` (within
  the partition the best-rewarded copy is kept; across partitions the earlier partition's copy).
* Preference (Pick-a-Pic: ``jpg_0.jpg, jpg_1.jpg, caption.txt, label_0.txt, label_1.txt, json`` + ``src.jpg``,
  ``ref_K.jpg``; the ``json`` holds the pair's row, ``task``, ``chosen_is_jpg_0`` and the candidates'
  ``chosen_generator_id``/``rejected_generator_id``): ``undecodable_image``, ``undersized_image``, ``nsfw``,
  ``near_duplicate_pair`` (the two images are the same picture to the perceptual hash or CLIP), ``duplicate_pair``
  (the same two candidates already paired).

Every sample's ``json`` has the same fields of the same type in every task (so a whole version loads as one dataset,
see :mod:`pipelines.dataset_card`): all the label (or pair) columns, null where a task has no value, list columns
always lists (``clip_i_per_ref``, ``reference_types``: ``[]`` when empty, never null). Each source declares the
JSON types from its parquet schema (``json_types(partition)``), so a field null in every sample of a version still
gets its column type.

Which image is ``jpg_0`` alternates over the kept pairs, task by task and partition by partition in build order, in
an order drawn from the seed and the pair ids, so ``label_0`` is balanced over the corpus (to within half a pair,
ties aside) and reproducible; a refresh continues the alternation where the referenced partitions left it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pipelines.paths import Layout


class CorpusFilters:
    """The image filters both corpora share, configured by the profile's ``filters`` section::

        filters:
          min_image_side: 32                   # undersized_image below this
          dedup: {phash_max_distance: 4, clip_cosine: 0.98, exact: false}   # null disables either
          nsfw: null                           # or {model: <dir or hub id>, threshold: 0.5}

    ``dedup.exact`` (default false): true compares every item with every kept one (brute force, O(N²));
    false looks the kept items up through indexes (``NearDuplicateFilter(exact=False)``): pHash stays exact, CLIP
    near duplicates may be missed at the recall ``bench/dedup.py`` measures. The SFT manifest records the mode
    (``dedup``). The NSFW classifier is loaded on first use, only when a profile names one.
    """

    def __init__(self, settings: dict[str, Any], device: str = "cpu"):
        from labelers.filters import NearDuplicateFilter

        self.settings = settings
        self.min_side = int(settings.get("min_image_side", 0))
        dedup = settings.get("dedup") or {}
        self.phash_max_distance = dedup.get("phash_max_distance")
        self.clip_cosine = dedup.get("clip_cosine")
        self.dedup_exact = bool(dedup.get("exact", False))
        self.duplicates = NearDuplicateFilter(phash_max_distance=self.phash_max_distance,
                                              cosine_threshold=self.clip_cosine, exact=self.dedup_exact)
        nsfw = settings.get("nsfw")
        self.nsfw = None
        if nsfw:
            from labelers.filters import NsfwClassifier
            from pipelines.zoo import resolve_model

            self.nsfw = NsfwClassifier(resolve_model(nsfw["model"]), threshold=float(nsfw.get("threshold", 0.5)),
                                       device=device)

    def image_problem(self, image: Any) -> str | None:
        """Why a decoded candidate image (or the exception that replaced it) cannot be used, or None."""
        from labelers.filters import check_image

        if image is None or isinstance(image, Exception):
            return "undecodable_image"
        ok, reason = check_image(image, self.min_side)
        return None if ok else reason

    def nsfw_flags(self, images: list[Any]) -> list[bool]:
        if self.nsfw is None or not images:
            return [False] * len(images)
        return [not ok for ok, _ in self.nsfw.filter_batch(images)]


def perceptual_hashes(images: list[Any]) -> list[int]:
    from labelers.filters import perceptual_hash

    return [perceptual_hash(image) for image in images]


def load_embeddings(layout: Layout, partition: str) -> dict[str, Any]:
    """candidate_id -> CLIP image embedding stored by ``reward_labels`` (empty when the partition has none)."""
    import numpy as np
    import polars as pl

    path = layout.asset_dir("reward_labels", partition) / "embeddings.parquet"
    if not path.exists():
        return {}
    table = pl.read_parquet(path)
    vectors = np.asarray(table["embedding"].to_list(), dtype=np.float32)
    return dict(zip(table["candidate_id"].to_list(), vectors))


def _stack(vectors: list[Any]):
    import numpy as np

    if not vectors or any(v is None for v in vectors):
        return None
    return np.stack(vectors).astype(np.float32)


# ------------------------------------------------------------------------------------------------ SFT
class SftSource:
    """Per partition: the ok, non-held-out candidates whose reward is at least the partition's
    ``sft_min_reward_quantile`` (a per-partition threshold, so a partition's segment does not change when other
    partitions arrive), best reward first, through the image filters and the duplicate memory."""

    def __init__(self, layout: Layout, prompts: dict[str, dict[str, Any]], settings: dict[str, Any],
                 filters: CorpusFilters):
        self.layout = layout
        self.prompts = prompts
        self.quantile = float(settings["corpora"].get("sft_min_reward_quantile", 0.0))
        self.filters = filters
        # for the manifest: whether the duplicate memory was searched exhaustively (see CorpusFilters)
        self.dedup_mode = {"exact": filters.dedup_exact}
        self._json_types: dict[str, dict[str, Any]] = {}

    def json_types(self, partition: str) -> dict[str, Any]:
        """The declared JSON types of the partition's samples (:class:`pipelines.corpora.PartitionSource`)."""
        return self._json_types.get(partition, {})

    def reused(self, partition: str, rows) -> None:
        if not len(rows):
            return
        embeddings = load_embeddings(self.layout, partition)
        ids = rows["candidate_id"].to_list()
        self.filters.duplicates.add_kept(ids, rows["image_sha256"].to_list(), _phashes(rows),
                                         _stack([embeddings.get(i) for i in ids]) if embeddings else None)

    def samples(self, partition: str, drops: Counter) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        import polars as pl

        from labelers.filters import judge_failure
        from pipelines.candidates import load_candidate_images
        from pipelines.dataset_card import schema_json_type
        from pipelines.io import encode_image

        labels = pl.read_parquet(self.layout.labels(partition)).join(
            pl.read_parquet(self.layout.candidates(partition)).select("candidate_id", "image_sha256"),
            on="candidate_id", how="left")
        schema = {name: dtype for name, dtype in labels.schema.items() if name != "raw_judgement"}
        self._json_types[partition] = {"json": schema_json_type(schema, {
            "task": "string", "text": "string", "sft_min_reward": "float64"})}
        lists = [name for name, dtype in schema.items() if isinstance(dtype, (pl.List, pl.Array))]
        heldout = labels["prompt_id"].map_elements(lambda p: self.prompts[p]["split"] == "heldout",
                                                   return_dtype=pl.Boolean)
        if heldout.any():
            drops["heldout_prompt"] += int(heldout.sum())
        usable = []
        for row in labels.filter(~heldout).iter_rows(named=True):
            ok, reason = judge_failure(row)
            if ok:
                usable.append(row)
            else:
                drops[reason] += 1
        if not usable:
            return
        rewards = pl.Series([row["reward"] for row in usable], dtype=pl.Float64)
        threshold = float(rewards.quantile(self.quantile, "lower"))
        kept = [row for row in usable if row["reward"] >= threshold]
        if len(kept) < len(usable):
            drops["below_reward_threshold"] += len(usable) - len(kept)
        kept.sort(key=lambda row: (-row["reward"], row["candidate_id"]))

        images = load_candidate_images(self.layout.asset_dir("candidate_images", partition) / "shards",
                                       {row["candidate_id"] for row in kept})
        checked = []
        for row in kept:
            problem = self.filters.image_problem(images.get(row["candidate_id"]))
            if problem:
                drops[problem] += 1
            else:
                checked.append(row)
        flags = self.filters.nsfw_flags([images[row["candidate_id"]] for row in checked])
        if any(flags):
            drops["nsfw"] += sum(flags)
        checked = [row for row, flagged in zip(checked, flags) if not flagged]
        if not checked:
            return
        embeddings = load_embeddings(self.layout, partition)
        ids = [row["candidate_id"] for row in checked]
        phashes = perceptual_hashes([images[i] for i in ids])
        verdicts = self.filters.duplicates.filter_batch(
            ids, [row["image_sha256"] for row in checked], phashes,
            _stack([embeddings.get(i) for i in ids]) if embeddings else None)
        for row, phash, (ok, reason) in zip(checked, phashes, verdicts):
            if not ok:
                drops[reason] += 1
                continue
            prompt = self.prompts[row["prompt_id"]]
            meta = {k: v for k, v in row.items() if k != "raw_judgement"}
            meta.update({name: list(meta[name] or []) for name in lists})  # a list column is a list in every task
            meta.update(task=prompt["task"], text=prompt["text"], sft_min_reward=threshold)
            sample = {"__key__": row["candidate_id"], "jpg": encode_image(images[row["candidate_id"]], "jpg"),
                      "txt": prompt["text"], "json": json.dumps(meta, default=str).encode(),
                      **conditioning_members(prompt)}  # an edit / multi_ref sample trains with its images
            yield sample, {"candidate_id": row["candidate_id"], "prompt_id": row["prompt_id"],
                           "task": prompt["task"], "reward": row["reward"], "image_sha256": row["image_sha256"],
                           "phash": f"{phash:016x}"}


def conditioning_members(prompt: dict[str, Any]) -> dict[str, bytes]:
    """``src.jpg`` (edit) and ``ref_K.jpg`` (multi_ref) members of a sample: the images its task conditions on."""
    from PIL import Image

    from pipelines.io import encode_image

    members: dict[str, bytes] = {}
    if prompt.get("source_image"):
        with Image.open(prompt["source_image"]) as src:
            members["src.jpg"] = encode_image(src.convert("RGB"), "jpg")
    for k, ref_path in enumerate(prompt.get("reference_images") or []):
        with Image.open(ref_path) as ref:
            members[f"ref_{k}.jpg"] = encode_image(ref.convert("RGB"), "jpg")
    return members


def _phashes(rows) -> list[int] | None:
    return rows["phash"].to_list() if "phash" in rows.columns else None


# ------------------------------------------------------------------------------------------------ preference
class PreferenceSource:
    """Per partition: every pair whose two images pass the filters and differ, not already paired, as Pick-a-Pic
    samples with ``jpg_0`` balanced between chosen and rejected."""

    def __init__(self, layout: Layout, prompts: dict[str, dict[str, Any]], seed: int, filters: CorpusFilters):
        self.layout = layout
        self.prompts = prompts
        self.seed = seed
        self.filters = filters
        self.paired: set[tuple[str, str]] = set()
        self.written = 0  # pairs before this partition (in build order): where the jpg_0 alternation stands
        self._json_types: dict[str, dict[str, Any]] = {}

    def json_types(self, partition: str) -> dict[str, Any]:
        """The declared JSON types of the partition's samples (:class:`pipelines.corpora.PartitionSource`)."""
        return self._json_types.get(partition, {})

    def reused(self, partition: str, rows) -> None:
        if len(rows):
            self.paired.update(_unordered(a, b) for a, b in zip(rows["chosen_id"], rows["rejected_id"]))
        self.written += len(rows)

    def _near_duplicates(self, phash_a: int | None, phash_b: int | None, emb_a: Any, emb_b: Any) -> bool:
        import numpy as np

        limit = self.filters.phash_max_distance
        if limit is not None and bin(phash_a ^ phash_b).count("1") <= limit:
            return True
        if self.filters.clip_cosine is not None and emb_a is not None and emb_b is not None:
            cosine = float(np.dot(emb_a, emb_b) / (np.linalg.norm(emb_a) * np.linalg.norm(emb_b) + 1e-12))
            return cosine >= self.filters.clip_cosine
        return False

    def samples(self, partition: str, drops: Counter) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        import polars as pl

        from pipelines.candidates import load_candidate_images
        from pipelines.dataset_card import schema_json_type

        pairs = pl.read_parquet(self.layout.pairs(partition))
        self._json_types[partition] = {"json": schema_json_type(pairs.schema, {
            "task": "string", "chosen_is_jpg_0": "bool", "chosen_generator_id": "string",
            "rejected_generator_id": "string", "reference_types": {"list": "string"}})}
        keys = set(pairs["chosen_id"].to_list()) | set(pairs["rejected_id"].to_list())
        images = load_candidate_images(self.layout.asset_dir("candidate_images", partition) / "shards", keys)
        embeddings = load_embeddings(self.layout, partition)
        generators = dict(pl.read_parquet(self.layout.candidates(partition), columns=["candidate_id", "generator_id"])
                          .iter_rows())
        problems = {key: self.filters.image_problem(images.get(key)) for key in keys}
        clean = sorted(key for key, problem in problems.items() if problem is None)
        nsfw = dict(zip(clean, self.filters.nsfw_flags([images[key] for key in clean])))
        # once per image, not once per pair it appears in (all_pairs puts an image in several)
        phashes = (dict(zip(clean, perceptual_hashes([images[key] for key in clean])))
                   if self.filters.phash_max_distance is not None else {})
        kept = []
        for pair in pairs.sort("pair_id").iter_rows(named=True):
            ids = (pair["chosen_id"], pair["rejected_id"])
            problem = next((problems[i] for i in ids if problems[i]), None)
            if problem:
                drops[problem] += 1
            elif any(nsfw[i] for i in ids):
                drops["nsfw"] += 1
            elif _unordered(*ids) in self.paired:
                drops["duplicate_pair"] += 1
            elif self._near_duplicates(phashes.get(ids[0]), phashes.get(ids[1]), embeddings.get(ids[0]),
                                       embeddings.get(ids[1])):
                drops["near_duplicate_pair"] += 1
            else:
                self.paired.add(_unordered(*ids))
                kept.append(pair)
        # One alternation running through every task and partition in build order: the whole corpus is balanced to
        # within half a pair, and each task's subset to within about one pair per partition.
        order = sorted(kept, key=lambda pair: (self.prompts[pair["prompt_id"]]["task"],
                                               hashlib.sha256(f"{self.seed}:{pair['pair_id']}".encode()).hexdigest()))
        for pair in order:
            yield self._sample(pair, images, generators, chosen_first=self.written % 2 == 0)
            self.written += 1

    def _sample(self, pair: dict[str, Any], images: dict[str, Any], generators: dict[str, str], chosen_first: bool):
        from PIL import Image

        from pipelines.io import encode_image

        prompt = self.prompts[pair["prompt_id"]]
        chosen, rejected = images[pair["chosen_id"]], images[pair["rejected_id"]]
        first, second = (chosen, rejected) if chosen_first else (rejected, chosen)
        label = float(pair["label"])
        label_0 = label if chosen_first else 1.0 - label
        sample = {
            "__key__": pair["pair_id"],
            "jpg_0.jpg": encode_image(first, "jpg"),
            "jpg_1.jpg": encode_image(second, "jpg"),
            "caption.txt": prompt["text"],
            "label_0.txt": _label_text(label_0),
            "label_1.txt": _label_text(1.0 - label_0),
            # the generator ids are what the Pick-a-Pic export writes as model_0/model_1
            "json": json.dumps({**pair, "task": prompt["task"], "chosen_is_jpg_0": chosen_first,
                                "chosen_generator_id": generators.get(pair["chosen_id"]),
                                "rejected_generator_id": generators.get(pair["rejected_id"]),
                                "reference_types": list(prompt.get("reference_types") or [])},
                               default=str).encode(),
        }
        sample.update(conditioning_members(prompt))
        return sample, {"pair_id": pair["pair_id"], "prompt_id": pair["prompt_id"], "task": prompt["task"],
                        "chosen_id": pair["chosen_id"], "rejected_id": pair["rejected_id"],
                        "label_0": label_0, "caption": prompt["text"],
                        "image_0_id": pair["chosen_id"] if chosen_first else pair["rejected_id"],
                        "image_1_id": pair["rejected_id"] if chosen_first else pair["chosen_id"]}


def _unordered(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _label_text(value: float) -> str:
    return "0.5" if value == 0.5 else str(int(value)) if value in (0.0, 1.0) else f"{value:.6g}"


def shard_limits(settings: dict[str, Any]):
    from pipelines.corpora import ShardLimits

    corpora = settings["corpora"]
    return ShardLimits(max_samples=int(corpora.get("shard_max_samples", 1000)),
                       max_bytes=int(corpora["shard_max_bytes"]) if corpora.get("shard_max_bytes") else None)
