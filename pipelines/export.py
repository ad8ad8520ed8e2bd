"""Export the preference corpus to a Hugging Face dataset with Pick-a-Pic v2's columns.

Diffusion-DPO's training script (SalesforceAIResearch/DiffusionDPO ``train.py``) and PickScore's trainer read
Pick-a-Pic (``yuvalkirstain/pickapic_v2``) through ``datasets.load_dataset(name_or_dir)``, so a corpus exported in
that shape trains with them unchanged (``--dataset_name <out_dir>``). What they read:

- Diffusion-DPO: ``jpg_0``/``jpg_1`` (JPEG bytes, opened with ``Image.open(io.BytesIO(...))``), ``label_0`` (the
  pair is flipped when ``label_0 == 0``, so ``jpg_0`` is the winner otherwise), ``caption``; ties are removed with
  ``label_0 in (0, 1)`` -- but only when the dataset name contains ``pickapic`` -- and ``model_0``/``model_1`` are
  substring-tested (``'dream' in m0``) by ``--dreamlike_pairs_only``, so they must be strings.
- PickScore: ``jpg_0``/``jpg_1``, ``label_0``/``label_1``, ``caption``, ``num_example_per_prompt`` (made a tensor,
  so an integer), filters on ``has_label`` and ``are_different``, ``image_0_uid``/``image_1_uid``, and drops the
  pandas artefact ``__index_level_0__`` when limiting examples per prompt.

Pick-a-Pic v2's features (dataset card): ``are_different`` bool, ``best_image_uid`` string, ``caption`` string,
``created_at`` timestamp[ns], ``has_label`` bool, ``image_0_uid``/``image_1_uid``/``image_0_url``/``image_1_url``
string, ``jpg_0``/``jpg_1`` binary, ``label_0``/``label_1`` float64, ``model_0``/``model_1`` string,
``ranking_id``/``user_id``/``num_example_per_prompt``/``__index_level_0__`` int64. The export fills those it can
fill meaningfully, with the same dtypes (see :func:`pickapic_features`), and leaves out ``created_at``,
``user_id`` and the image URLs (no humans, no web app) rather than invent them; it adds prefmill's ``pair_id``,
``prompt_id`` and ``task`` for tracing a row back to the corpus.

What is written, and what is left out (counted by reason in the summary's ``left_out``):

- labels: Diffusion-DPO reads ``label_0`` as 1 (``jpg_0`` wins), 0 (flipped) or 0.5 (a tie, removed or read as
  ``jpg_0`` winning), so a soft ``label_0`` (0.73 from Bradley-Terry soft labels) would silently be a win for
  ``jpg_0``. Every exported ``label_0`` is one of 0, 0.5, 1: ``soft_labels="round"`` (default) rounds a soft one to
  the nearest (0.25 and 0.75 go to the strict preference) and counts it (``soft_label_rounded``),
  ``soft_labels="refuse"`` raises, naming how many and an example. Labels within 1e-9 of 0, 0.5, 1 are not soft.
- tasks: Pick-a-Pic trainers are text-to-image, and an ``edit``/``multi_ref`` pair's conditioning images
  (``src.jpg``/``ref_K.jpg``) have no Pick-a-Pic column, so by default only ``t2i`` pairs are exported and the
  others are left out as ``task_not_t2i:<task>`` (``task_not_selected:<task>`` under another selection);
  ``tasks=[...]`` (or ``None``: all) exports others, and the summary's ``notes`` say their conditioning is missing.
- ties: ``drop_ties`` leaves out 0.5/0.5 pairs (after rounding) as ``tie_dropped``.
- ``model_0``/``model_1``: the generator ids of the two candidates (the sample JSON's ``chosen_generator_id``/
  ``rejected_generator_id``), ``""`` for a corpus built before it recorded them.

The output is HF-hub shaped (``data/train-00000-of-0000N.parquet`` + a ``README.md`` dataset card whose ``configs``
name the files), written into a temporary sibling and renamed into place, so a reader never sees half an export.
Rows are in corpus (manifest) order, so the same corpus version gives the same files.

datasets, pyarrow and polars are imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROWS_PER_FILE = 1000
ROW_GROUP_ROWS = 100  # small row groups: image rows are large, and readers stream a row group at a time
MARKER = "prefmill_export.json"  # provenance, and what tells a previous export (safe to replace) from other data

# name -> datasets dtype, in Pick-a-Pic v2's column order, then prefmill's columns
PICKAPIC_COLUMNS: dict[str, str] = {
    "are_different": "bool",
    "best_image_uid": "string",
    "caption": "string",
    "has_label": "bool",
    "image_0_uid": "string",
    "image_1_uid": "string",
    "jpg_0": "binary",
    "jpg_1": "binary",
    "label_0": "float64",
    "label_1": "float64",
    "model_0": "string",
    "model_1": "string",
    "ranking_id": "int64",
    "num_example_per_prompt": "int64",
    "__index_level_0__": "int64",
}
EXTRA_COLUMNS: dict[str, str] = {"pair_id": "string", "prompt_id": "string", "task": "string"}
HARD_LABELS = (0.0, 0.5, 1.0)  # the label_0 values Diffusion-DPO's train.py reads as meant
LABEL_TOLERANCE = 1e-9  # closer than this to a hard label is that label, not a soft one
SOFT_LABEL_POLICIES = ("round", "refuse")
DEFAULT_TASKS = ("t2i",)  # Pick-a-Pic / Diffusion-DPO is text-to-image
CONDITIONING = {"edit": "source image (src.jpg)", "multi_ref": "reference images (ref_K.jpg)"}


def pickapic_features():
    """The ``datasets.Features`` of the export: Pick-a-Pic v2's dtypes for the columns it shares with it."""
    import datasets

    return datasets.Features({name: datasets.Value(dtype)
                              for name, dtype in {**PICKAPIC_COLUMNS, **EXTRA_COLUMNS}.items()})


def hard_label(label_0: float) -> tuple[float, bool]:
    """``label_0`` as the nearest of 0, 0.5, 1, and whether it was soft (further than ``LABEL_TOLERANCE`` from all
    three). The rounding is symmetric (``hard_label(1 - x) == 1 - hard_label(x)``): exactly 0.25/0.75 go to the
    strict preference."""
    for value in HARD_LABELS:
        if abs(label_0 - value) <= LABEL_TOLERANCE:
            return value, False
    offset = label_0 - 0.5
    return (0.5 if abs(offset) < 0.25 else 1.0 if offset > 0 else 0.0), True


def _soft_label_error(count: int, key: str, label_0: float, where: str) -> ValueError:
    return ValueError(
        f"{count} pair(s) {where} have a soft label_0 (not 0, 0.5 or 1), e.g. {key} with label_0={label_0:g}; "
        "Diffusion-DPO reads anything but 0 as jpg_0 winning: export with soft_labels='round' "
        "(--soft-labels round) to round them to the nearest of 0, 0.5, 1")


def _task_reason(task: str, tasks: frozenset[str] | None) -> str:
    return f"task_not_t2i:{task}" if tasks == frozenset(DEFAULT_TASKS) else f"task_not_selected:{task}"


def _ranking_id(pair_id: str) -> int:
    """A stable non-negative int64 per pair (Pick-a-Pic's ``ranking_id`` is an integer id of the comparison)."""
    return int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big") >> 1


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _image_uids(meta: dict[str, Any], jpg_0: bytes, jpg_1: bytes) -> tuple[str, str]:
    """The candidate ids of the two images: from the sample's JSON (``image_0_id``/``image_1_id``, or
    ``chosen_id``/``rejected_id`` with ``chosen_is_jpg_0``), else content ids of the JPEG bytes."""
    for a, b in (("image_0_uid", "image_1_uid"), ("image_0_id", "image_1_id")):
        if meta.get(a) and meta.get(b):
            return str(meta[a]), str(meta[b])
    if meta.get("chosen_id") and meta.get("rejected_id") and isinstance(meta.get("chosen_is_jpg_0"), bool):
        chosen, rejected = str(meta["chosen_id"]), str(meta["rejected_id"])
        return (chosen, rejected) if meta["chosen_is_jpg_0"] else (rejected, chosen)
    return hashlib.sha256(jpg_0).hexdigest()[:32], hashlib.sha256(jpg_1).hexdigest()[:32]


def _models(meta: dict[str, Any]) -> tuple[str, str]:
    """Generator ids of ``jpg_0``/``jpg_1`` when the sample's JSON has them (``model_0``/``model_1``, or
    ``chosen_generator_id``/``rejected_generator_id`` with ``chosen_is_jpg_0``, as
    :class:`pipelines.corpus_sources.PreferenceSource` writes them), else ``""``: Diffusion-DPO substring-tests
    these, so they are never null."""
    if meta.get("model_0") is not None and meta.get("model_1") is not None:
        return str(meta["model_0"]), str(meta["model_1"])
    chosen, rejected = meta.get("chosen_generator_id"), meta.get("rejected_generator_id")
    if chosen is not None and rejected is not None and isinstance(meta.get("chosen_is_jpg_0"), bool):
        return (str(chosen), str(rejected)) if meta["chosen_is_jpg_0"] else (str(rejected), str(chosen))
    return "", ""


def _prompt_key(prompt_id: Any, caption: str) -> str:
    return f"id:{prompt_id}" if prompt_id not in (None, "") else f"caption:{caption}"


def _selected_index(version_dir: str, tasks: frozenset[str] | None, storage_options: dict | None):
    """``index.parquet``'s rows of the selected tasks, with ``label_0`` and ``prompt_id`` or ``caption``; None
    without an index that says."""
    import polars as pl

    from pipelines.corpus_format import read_index

    index = read_index(version_dir, storage_options=storage_options)
    if index is None:
        return None
    if "label_0" not in index.columns or not ({"prompt_id", "caption"} & set(index.columns)):
        return None
    if tasks is not None:
        if "task" not in index.columns:
            return None
        index = index.filter(pl.col("task").is_in(sorted(tasks)))
    return index


def _refuse_soft_labels_in_index(index) -> None:
    """Fail before reading a shard when the index already shows soft labels (``soft_labels="refuse"``)."""
    labels = index["label_0"].to_list()
    soft = [i for i, label in enumerate(labels) if hard_label(float(label))[1]]
    if soft:
        name = next((c for c in ("key", "pair_id") if c in index.columns), None)
        example = str(index[name][soft[0]]) if name else f"index row {soft[0]}"
        raise _soft_label_error(len(soft), example, float(labels[soft[0]]), "in index.parquet")


def _expected_per_prompt(index, drop_ties: bool) -> dict[str, int]:
    """Rows per prompt the export will hold, from the selected rows of ``index.parquet`` (``prompt_id`` or
    ``caption``, ``label_0`` for ties, rounded as the rows are), so ``num_example_per_prompt`` is known while rows
    stream out."""
    if drop_ties:
        keep = [hard_label(float(label))[0] != 0.5 for label in index["label_0"].to_list()]
        index = index.filter(keep)
    prompt_ids = index["prompt_id"].to_list() if "prompt_id" in index.columns else [None] * index.height
    captions = index["caption"].to_list() if "caption" in index.columns else [""] * index.height
    counts: dict[str, int] = {}
    for prompt_id, caption in zip(prompt_ids, captions):
        key = _prompt_key(prompt_id, (caption or "").strip())
        counts[key] = counts.get(key, 0) + 1
    return counts


def _pickapic_rows(version_dir: str, drop_ties: bool, tasks: frozenset[str] | None, soft_labels: str,
                   storage_options: dict | None, stats: Counter, refused: list):
    """Rows (without ``num_example_per_prompt`` and ``__index_level_0__``) in corpus order; what is left out is
    counted in ``stats`` (``left_out:<reason>``), soft labels are rounded (``soft_label_rounded``) or, under
    ``"refuse"``, left out of the rows and recorded in ``refused`` as ``(key, label_0)`` for the caller to raise."""
    from trainers.data import corpus_dataset, parse_label

    # rank/world_size explicit: a RANK in the environment must not make the export read a part of the corpus
    samples = corpus_dataset(version_dir, kind="raw", shuffle=False, rank=0, world_size=1,
                             storage_options=storage_options)
    for sample in samples:
        key = sample["__key__"]
        label_0, label_1 = parse_label(sample["label_0.txt"]), parse_label(sample["label_1.txt"])
        if abs(label_0 + label_1 - 1.0) > 1e-6 or not (0.0 <= label_0 <= 1.0):
            raise ValueError(f"sample {key}: labels {label_0}, {label_1} are not a preference (they must sum to 1)")
        meta = json.loads(_text(sample["json"])) if "json" in sample else {}
        meta = meta if isinstance(meta, dict) else {}
        task = str(meta.get("task") or "t2i")
        if tasks is not None and task not in tasks:
            stats["left_out:" + _task_reason(task, tasks)] += 1
            continue
        raw_label_0 = label_0
        label_0, soft = hard_label(label_0)
        label_1 = 1.0 - label_0
        if soft:
            if soft_labels == "refuse":
                refused.append((key, raw_label_0))
                continue
            stats["soft_label_rounded"] += 1
        tie = label_0 == 0.5
        stats["ties"] += tie
        if tie and drop_ties:
            stats["left_out:tie_dropped"] += 1
            continue
        stats["task:" + task] += 1
        jpg_0, jpg_1 = bytes(sample["jpg_0.jpg"]), bytes(sample["jpg_1.jpg"])
        uid_0, uid_1 = _image_uids(meta, jpg_0, jpg_1)
        model_0, model_1 = _models(meta)
        caption = _text(sample["caption.txt"]).strip()
        pair_id = str(meta.get("pair_id") or key)
        yield {
            "are_different": uid_0 != uid_1 and jpg_0 != jpg_1,
            "best_image_uid": uid_0 if label_0 > label_1 else uid_1 if label_1 > label_0 else "",
            "caption": caption,
            "has_label": True,
            "image_0_uid": uid_0,
            "image_1_uid": uid_1,
            "jpg_0": jpg_0,
            "jpg_1": jpg_1,
            "label_0": label_0,
            "label_1": label_1,
            "model_0": model_0,
            "model_1": model_1,
            "ranking_id": _ranking_id(pair_id),
            "pair_id": pair_id,
            "prompt_id": str(meta["prompt_id"]) if meta.get("prompt_id") is not None else None,
            "task": task,
        }


def _dataset_card(summary: dict[str, Any]) -> str:
    columns = ", ".join(f"`{c}`" for c in {**PICKAPIC_COLUMNS, **EXTRA_COLUMNS})
    tasks = ", ".join(summary["tasks"]) if summary["tasks"] else "all"
    left_out = ", ".join(f"{reason} {n}" for reason, n in summary["left_out"].items()) or "nothing"
    notes = "".join(f"\n{note}\n" for note in summary["notes"])
    return f"""---
configs:
- config_name: default
  data_files:
  - split: {summary['split']}
    path: data/{summary['split']}-*
---
# prefmill preference corpus, Pick-a-Pic v2 columns

Exported from corpus version `{summary['version']}` ({summary['rows']} pairs in {summary['files']} files;
mean `label_0` {summary['label_0_mean']}; ties: {summary['ties']}, dropped: {summary['dropped_ties']};
soft labels rounded to 0/0.5/1: {summary['soft_label_rounded']}; tasks: {tasks}; left out: {left_out}).
{notes}
Columns: {columns}. `jpg_0`/`jpg_1` are JPEG bytes; `label_0` is 0, 0.5 or 1 and `label_0 + label_1 == 1` (`1`/`0`
strict preference, `0.5` a tie); `image_*_uid` are prefmill candidate ids; `ranking_id` is a hash of `pair_id`;
`model_0`/`model_1` are the generator ids of the two images where the corpus records them, else empty.
Pick-a-Pic's `created_at`, `user_id` and image URLs are absent: the labels come from prefmill's reward models and
judges, not from users.

Diffusion-DPO's `train.py` removes ties (`label_0 in (0, 1)`) only when `--dataset_name` contains `pickapic`, and
otherwise treats a tie as `jpg_0` preferred: export with `--drop-ties`, or name the directory `...pickapic...`.

```python
from datasets import load_dataset
ds = load_dataset("<this directory>")["{summary['split']}"]
```
"""


class _PartWriter:
    """Rows into ``.part-NNNNN.parquet`` files of ``rows_per_file`` rows, written a row group at a time so a file
    of large image rows is never held in memory whole."""

    def __init__(self, directory: Path, schema, rows_per_file: int):
        self.directory, self.schema, self.rows_per_file = directory, schema, rows_per_file
        self.parts: list[Path] = []
        self.rows = 0
        self._writer = None
        self._buffer: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        if self.rows % self.rows_per_file == 0:
            self._close_part()
            self.parts.append(self.directory / f".part-{len(self.parts):05d}.parquet")
            self._writer = pq.ParquetWriter(self.parts[-1], self.schema)
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer.clear()

    def _close_part(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None

    def close(self) -> list[Path]:
        import pyarrow.parquet as pq

        self._close_part()
        if not self.parts:  # an empty export still loads: one file with the schema
            self.parts.append(self.directory / ".part-00000.parquet")
            pq.write_table(self.schema.empty_table(), self.parts[-1])
        return self.parts


def export_pickapic(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rows_per_file: int = ROWS_PER_FILE,
    drop_ties: bool = False,
    tasks: Iterable[str] | None = DEFAULT_TASKS,
    soft_labels: str = "round",
    split: str = "train",
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Write the preference corpus at ``corpus_dir`` (a version directory, or a corpus root whose ``latest`` is
    used; local or an fsspec URL) to ``out_dir`` as ``data/{split}-NNNNN-of-MMMMM.parquet`` with Pick-a-Pic v2's
    columns, ``rows_per_file`` rows per file, and return a summary: rows, files, label_0 mean, ties,
    ``left_out`` (reason -> pairs: ``task_not_t2i:<task>`` / ``task_not_selected:<task>``, ``tie_dropped``),
    ``soft_label_rounded``, ``rows_by_task`` and ``notes`` (e.g. that edit pairs lack their source image).

    ``drop_ties`` leaves out 0.5/0.5 pairs (what Diffusion-DPO trains on). ``tasks`` keeps only pairs of those
    tasks, ``t2i`` by default: Pick-a-Pic is text-to-image, and an ``edit`` or ``multi_ref`` pair exported without
    its ``src.jpg`` / ``ref_K.jpg`` conditioning is a caption and two images a t2i trainer would misread; pass
    e.g. ``["t2i", "edit"]`` (or ``None`` for every task) to export them anyway (``task`` says which is which).
    ``soft_labels``: ``"round"`` a soft ``label_0`` to the nearest of 0, 0.5, 1 (counted), or ``"refuse"`` to
    raise (before writing anything) when a pair to export has one. ``num_example_per_prompt`` must be
    known as rows stream out, so it comes from ``index.parquet`` (checked against the shards at the end); without
    a usable index the shards are read twice. ``out_dir`` is replaced atomically; an existing ``out_dir`` that is
    not a previous export (no ``prefmill_export.json``) is refused, not deleted.
    """
    from pipelines.corpus_format import corpus_version_dir, read_manifest
    from pipelines.io import atomic_dir
    from pipelines.prompts import TASKS

    if rows_per_file < 1:
        raise ValueError("rows_per_file must be >= 1")
    if soft_labels not in SOFT_LABEL_POLICIES:
        raise ValueError(f"soft_labels must be one of {SOFT_LABEL_POLICIES}, not {soft_labels!r}")
    selected = frozenset(tasks) if tasks is not None else None
    if selected is not None and (not selected or selected - set(TASKS)):
        raise ValueError(f"tasks must be some of {TASKS} (or None for all), not {sorted(selected)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise FileExistsError(f"{out} exists and is not a previous export (no {MARKER}); not replacing it")
    version_dir = corpus_version_dir(corpus_dir, storage_options=storage_options)
    manifest = read_manifest(version_dir, storage_options=storage_options)
    if manifest.get("corpus") not in (None, "preference_corpus"):
        raise ValueError(f"{version_dir} is a {manifest['corpus']}, not a preference corpus")
    index = _selected_index(version_dir, selected, storage_options)
    if index is not None:
        if soft_labels == "refuse":
            _refuse_soft_labels_in_index(index)
        expected = _expected_per_prompt(index, drop_ties)
    else:
        expected, refused = {}, []
        for row in _pickapic_rows(version_dir, drop_ties, selected, soft_labels, storage_options, Counter(), refused):
            key = _prompt_key(row["prompt_id"], row["caption"])
            expected[key] = expected.get(key, 0) + 1
        if refused:
            raise _soft_label_error(len(refused), *refused[0], "in the shards")
    features = pickapic_features()
    stats: Counter = Counter()
    refused: list[tuple[str, float]] = []
    seen: Counter = Counter()
    label_0_sum = 0.0
    with atomic_dir(out) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        (tmp / "data").mkdir()
        writer = _PartWriter(tmp / "data", features.arrow_schema, rows_per_file)
        for row in _pickapic_rows(version_dir, drop_ties, selected, soft_labels, storage_options, stats, refused):
            key = _prompt_key(row["prompt_id"], row["caption"])
            if key not in expected:
                raise ValueError(f"pair {row['pair_id']} ({key}) is in the shards but not in index.parquet")
            seen[key] += 1
            row["num_example_per_prompt"] = expected[key]
            row["__index_level_0__"] = writer.rows
            label_0_sum += row["label_0"]
            writer.add(row)
        if refused:  # the index did not show them; nothing is written (the temporary directory goes)
            raise _soft_label_error(len(refused), *refused[0], "in the shards")
        if dict(seen) != expected:
            differ = sorted(k for k in set(seen) | set(expected) if seen.get(k, 0) != expected.get(k, 0))[:5]
            raise ValueError(f"index.parquet and the shards disagree on pairs per prompt (e.g. {differ}): "
                             f"{sum(seen.values())} rows read, {sum(expected.values())} indexed")
        parts = writer.close()
        for i, part in enumerate(parts):
            part.rename(tmp / "data" / f"{split}-{i:05d}-of-{len(parts):05d}.parquet")
        rows = writer.rows
        left_out = {reason.split(":", 1)[1]: n for reason, n in sorted(stats.items())
                    if reason.startswith("left_out:")}
        rows_by_task = {task.split(":", 1)[1]: n for task, n in sorted(stats.items()) if task.startswith("task:")}
        notes = [f"{n} {task} pairs are exported without their {CONDITIONING[task]}: Pick-a-Pic's columns have no "
                 f"place for it, so a text-to-image trainer reads them as caption + two images (the task column "
                 f"marks them)" for task, n in rows_by_task.items() if task in CONDITIONING]
        summary = {
            "rows": rows,
            "files": len(parts),
            "label_0_mean": round(label_0_sum / rows, 6) if rows else None,
            "left_out": left_out,
            "soft_labels": soft_labels,
            "soft_label_rounded": stats["soft_label_rounded"],
            "ties": stats["ties"],
            "dropped_ties": left_out.get("tie_dropped", 0),
            "tasks": sorted(selected) if selected is not None else None,
            "other_tasks": sum(n for reason, n in left_out.items() if reason.startswith("task_not_")),
            "rows_by_task": rows_by_task,
            "notes": notes,
            "split": split,
            "version": manifest.get("version") or version_dir.rstrip("/").rsplit("/", 1)[-1],
            "corpus_dir": version_dir,
            "out_dir": str(out),
            "columns": list(features),
        }
        (tmp / "README.md").write_text(_dataset_card(summary))
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
