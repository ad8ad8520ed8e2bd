"""The dataset card (``README.md``) of a corpus version, so ``datasets.load_dataset(<version dir>)`` loads the
whole version in one call (DESIGN.md "Data contracts"; issue 14).

``datasets``' ``webdataset`` builder infers its features from the first few samples of the first shard unless the
dataset card declares them. A corpus mixes tasks whose samples differ (``src.jpg`` only in edit samples,
``ref_K.jpg`` only in multi_ref ones, JSON fields that are null in one task and floats in another), so inference
fails (``Couldn't cast array of type double to null``). The card declares every feature of the version:

- ``__key__`` and ``__url__`` (strings the builder adds to every row);
- every member of every layout (``manifest.json["layouts"]``): images (``jpg``, ``src.jpg``, ``ref_K.jpg``, ...)
  as ``image``, text members as ``string``; a member a sample lacks loads as None (the builder fills every
  declared feature a sample does not have with None);
- each JSON member as a struct with the union of the fields of every sample, each with one type
  (:func:`json_type` per value, merged by :func:`merge_types`, completed by the types the corpus source declares
  from its tables; a field null in every sample is declared ``string``). A field a sample lacks loads as None.

and a ``configs`` entry naming the version's shards in manifest order — its own (``shards/...``) and those it
references in older versions (``../<older>/shards/...``) — as the ``train`` split, with its sample count (which
``datasets`` checks after loading). The markdown part describes the corpus: kind, version, counts by task and by
partition, drops by reason, the config.

JSON types are small JSON values, stored in segment records and the manifest (``json_types``)::

    "null" | "bool" | "int64" | "float64" | "string" | {"list": <type>} | {"struct": {field: <type>, ...}}

Nothing here imports Dagster or ``datasets``; the YAML is written in the form ``datasets.Features._from_yaml_list``
reads (checked by tests/unit/test_corpus_load_dataset.py).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from pipelines.corpus_format import CARD, read_manifest, shard_path, shard_url

SCALARS = ("null", "bool", "int64", "float64", "string")
# the webdataset builder's decoders (datasets/packaged_modules/webdataset): what a member loads as
TEXT_EXTENSIONS = ("txt", "text", "transcript")
INT_EXTENSIONS = ("cls", "cls2", "index", "inx", "id")
JSON_EXTENSIONS = ("json", "jsn")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif", "jpe", "ppm", "pgm", "pbm")

DESCRIPTIONS = {
    "sft_corpus": "Supervised fine-tuning samples: the best-rewarded candidate images of every labelled prompt "
                  "(above each partition's `corpora.sft_min_reward_quantile`), after the image, NSFW and duplicate "
                  "filters. `jpg` is the image, `txt` its prompt, `json` the label row (every judge score and "
                  "feedback, CLIP rewards, the aggregate `reward`, `task`, ...); edit samples carry their source "
                  "image (`src.jpg`), multi_ref samples their reference images (`ref_0.jpg`, ...).",
    "preference_corpus": "Preference pairs in the Pick-a-Pic layout: two images of one prompt (`jpg_0.jpg`, "
                         "`jpg_1.jpg`), the prompt (`caption.txt`) and their labels (`label_0.txt`, `label_1.txt`: "
                         "`1`/`0`, `0.5` for a tie; which image is `jpg_0` alternates so `label_0` is balanced). "
                         "`json` holds the pair row (`pair_id`, `chosen_id`, `rejected_id`, `p_chosen`, `margin`, "
                         "`label`, `task`, `chosen_is_jpg_0`, the generator ids, ...); edit pairs carry their "
                         "source image (`src.jpg`), multi_ref pairs their reference images (`ref_0.jpg`, ...).",
}


# ------------------------------------------------------------------------------------------------ JSON types
class JsonTypeConflict(ValueError):
    """Two samples of one corpus give a JSON field two types no single column can hold."""


def json_type(value: Any) -> Any:
    """The JSON type of a decoded JSON value (see the module docstring)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        inner: Any = "null"
        for item in value:
            inner = merge_types(inner, json_type(item))
        return {"list": inner}
    if isinstance(value, dict):
        return {"struct": {str(k): json_type(v) for k, v in value.items()}}
    raise JsonTypeConflict(f"not a JSON value: {type(value).__name__}")


def merge_types(a: Any, b: Any, where: str = "") -> Any:
    """One type holding values of both ``a`` and ``b``: null joins anything, int64 widens to float64, lists merge
    their items, structs take the union of their fields (first-seen order). Anything else raises
    :class:`JsonTypeConflict` naming the field (``where``)."""
    if a == "null":
        return b
    if b == "null" or a == b:
        return a
    if _numbers(a, b):
        return "float64"
    if isinstance(a, dict) and isinstance(b, dict):
        if "list" in a and "list" in b:
            return {"list": merge_types(a["list"], b["list"], f"{where}[]")}
        if "struct" in a and "struct" in b:
            fields = dict(a["struct"])
            for name, kind in b["struct"].items():
                fields[name] = merge_types(fields[name], kind, f"{where}.{name}") if name in fields else kind
            return {"struct": fields}
    raise JsonTypeConflict(f"JSON field {where or '<value>'} is {_show(a)} in one sample and {_show(b)} in another")


def fill_nulls(kind: Any, hint: Any) -> Any:
    """``kind`` with the parts it could not tell (null: every value seen was null or an empty list) taken from
    ``hint`` (the type a source declares, e.g. from its parquet schema), and the hint's fields it never saw
    added. A hint that disagrees with the values is ignored there: the values decide."""
    if hint is None or hint == "null":
        return kind
    if kind == "null":
        return hint
    if isinstance(kind, dict) and isinstance(hint, dict):
        if "list" in kind and "list" in hint:
            return {"list": fill_nulls(kind["list"], hint["list"])}
        if "struct" in kind and "struct" in hint:
            fields = {name: fill_nulls(sub, hint["struct"].get(name)) for name, sub in kind["struct"].items()}
            fields.update({name: sub for name, sub in hint["struct"].items() if name not in fields})
            return {"struct": fields}
    if _numbers(kind, hint):
        return "float64"  # a float column whose values all happened to be integral
    return kind


def _numbers(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and {a, b} == {"int64", "float64"}


def _show(kind: Any) -> str:
    return kind if isinstance(kind, str) else json.dumps(kind, sort_keys=True)[:120]


def polars_json_type(dtype: Any) -> Any:
    """The JSON type a polars column's values take in a sample's JSON (``json.dumps(..., default=str)``)."""
    import polars as pl

    if dtype == pl.Null:
        return "null"
    if dtype == pl.Boolean:
        return "bool"
    if dtype.is_integer():
        return "int64"
    if dtype.is_float():
        return "float64"
    if isinstance(dtype, (pl.List, pl.Array)):
        return {"list": polars_json_type(dtype.inner)}
    if isinstance(dtype, pl.Struct):
        return {"struct": {f.name: polars_json_type(f.dtype) for f in dtype.fields}}
    return "string"  # String, Categorical, dates and times, decimals (written through str)


def schema_json_type(schema: Any, extra: dict[str, Any] | None = None) -> Any:
    """The struct type of a JSON object holding a polars row of ``schema`` (name -> dtype) plus ``extra`` fields."""
    fields = {name: polars_json_type(dtype) for name, dtype in schema.items()}
    fields.update(extra or {})
    return {"struct": fields}


def json_member(name: str) -> bool:
    return _extension(name) in JSON_EXTENSIONS


def sample_json_types(sample: dict[str, Any]) -> dict[str, Any]:
    """member -> JSON type of each JSON member of a webdataset sample (bytes or str values)."""
    types = {}
    for name, value in sample.items():
        if name.startswith("__") or not json_member(name):
            continue
        text = value.decode("utf-8") if isinstance(value, (bytes, bytearray, memoryview)) else str(value)
        types[name] = json_type(json.loads(text))
    return types


def merge_member_types(into: dict[str, Any], more: dict[str, Any], where: str = "") -> dict[str, Any]:
    for member, kind in more.items():
        into[member] = merge_types(into[member], kind, f"{where}{member}") if member in into else kind
    return into


# ------------------------------------------------------------------------------------------------ features
def _extension(member: str) -> str:
    return member.rsplit(".", 1)[-1].lower()


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layout_members(layout: str) -> list[str]:
    """Member names of a layout key (``<task>:<member>,<member>,...``, :func:`pipelines.corpora.sample_layout`)."""
    _, _, members = layout.partition(":")
    return [m for m in members.split(",") if m]


def _yaml_type(kind: Any) -> dict[str, Any]:
    """A JSON type in the YAML form of ``datasets.Features._to_yaml_list``."""
    if isinstance(kind, str):
        return {"dtype": "string" if kind == "null" else kind}
    if "list" in kind:
        inner = _yaml_type(kind["list"])
        if list(inner) == ["dtype"]:
            inner = inner["dtype"]
        elif list(inner) == ["struct"]:
            inner = inner["struct"]
        return {"list": inner}
    # fields by name: the card of a version does not depend on which segments were written or reused
    return {"struct": [{"name": name, **_yaml_type(kind["struct"][name])} for name in sorted(kind["struct"])]}


def member_feature(member: str, json_types: dict[str, Any]) -> dict[str, Any]:
    """The YAML feature of one member (without its name)."""
    ext = _extension(member)
    if ext in IMAGE_EXTENSIONS:
        return {"dtype": "image"}
    if ext in TEXT_EXTENSIONS:
        return {"dtype": "string"}
    if ext in INT_EXTENSIONS:
        return {"dtype": "int64"}
    if ext in JSON_EXTENSIONS:
        return _yaml_type(json_types.get(member, "null"))
    return {"dtype": "binary"}  # kept as bytes by the builder


def members_by_task(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """member -> task -> samples holding it, from the manifest's shards (their layout and count)."""
    counts: dict[str, dict[str, int]] = {}
    for shard in manifest.get("shards", []):
        layout = shard.get("layout") or ""
        task = layout.partition(":")[0] or "any"
        for member in layout_members(layout):
            by_task = counts.setdefault(member, {})
            by_task[task] = by_task.get(task, 0) + int(shard.get("count", 0))
    for layout in manifest.get("layouts", {}):  # layouts of shards without counts still declare their members
        for member in layout_members(layout):
            counts.setdefault(member, {})
    return counts


def card_features(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """``dataset_info.features`` of a version (YAML list form): ``__key__``, every member, ``__url__``."""
    json_types = manifest.get("json_types") or {}
    members = sorted(members_by_task(manifest), key=_natural)
    return ([{"name": "__key__", "dtype": "string"}]
            + [{"name": member, **member_feature(member, json_types)} for member in members]
            + [{"name": "__url__", "dtype": "string"}])


def card_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """The YAML front matter: the shards as the ``train`` split of the default config, and its features."""
    shards = [shard_path(shard) for shard in manifest.get("shards", [])]
    corpus = manifest.get("corpus", "corpus")
    return {
        "pretty_name": f"prefmill {corpus} {manifest.get('version', '')}".strip(),
        "tags": ["prefmill", "webdataset", corpus],
        "configs": [{"config_name": "default", "default": True,
                     "data_files": [{"split": "train", "path": shards}]}],
        "dataset_info": {"config_name": "default", "features": card_features(manifest),
                         # num_examples is checked by datasets after loading; num_bytes (required with it) is the
                         # shards' size here, not the arrow size datasets would record
                         "splits": [{"name": "train", "num_bytes": int(manifest.get("num_bytes", 0)),
                                     "num_examples": int(manifest.get("num_samples", 0))}]},
    }


# ------------------------------------------------------------------------------------------------ card
def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _feature_name(feature: dict[str, Any]) -> str:
    if "dtype" in feature:
        return feature["dtype"]
    if "list" in feature:
        return "list"
    return "struct"


def card_text(manifest: dict[str, Any]) -> str:
    """The whole ``README.md`` of a version: YAML front matter (:func:`card_metadata`) and a short description."""
    import yaml

    corpus = manifest.get("corpus", "corpus")
    version = manifest.get("version", "")
    shards = manifest.get("shards", [])
    total = int(manifest.get("num_samples", 0))
    by_task: Counter = Counter()
    for shard in shards:
        by_task[(shard.get("layout") or "").partition(":")[0] or "any"] += int(shard.get("count", 0))
    own = sum(1 for shard in shards if not shard_path(shard).startswith("../"))
    members = members_by_task(manifest)
    features = {f["name"]: f for f in card_features(manifest)}

    lines = [f"# prefmill `{corpus}`, version `{version}`", ""]
    lines += [DESCRIPTIONS.get(corpus, "A prefmill WebDataset corpus."), ""]
    lines += ["Load the whole version in one call (every task; a member a sample does not have, such as `src.jpg` "
              "outside edit samples, and a JSON field a task does not fill are None):", "", "```python",
              "import datasets", "", 'ds = datasets.load_dataset("<this directory>", split="train")', "```", "",
              "The shards are plain WebDataset tars (`webdataset.WebDataset`, `trainers.data.corpus_dataset`); "
              "`manifest.json` is the version's commit (shards with sha256 and counts, drops, inputs, config) and "
              "`index.parquet` has one row per sample.", ""]
    lines += ["## Contents", ""]
    lines += _table(("", ""), [
        ("samples", total),
        ("shards", f"{len(shards)} ({own} written by this version, {len(shards) - own} referenced from older "
                   f"versions)"),
        ("bytes", manifest.get("num_bytes", 0)),
        ("input partitions", len(manifest.get("inputs", []))),
        ("previous version", f"`{manifest['previous_version']}`" if manifest.get("previous_version") else "none"),
        ("schema version", manifest.get("schema_version", "")),
    ])
    lines += ["", "Samples by task:", ""]
    lines += _table(("task", "samples"), sorted(by_task.items()))
    lines += ["", "## Columns", ""]
    rows = [("`__key__`", "string", "every sample (the sample key)")]
    for member in sorted(members, key=_natural):
        tasks = members[member]
        held = sum(tasks.values())
        where = "every sample" if held == total else (
            f"{held} samples ({', '.join(sorted(tasks))}); None elsewhere")
        rows.append((f"`{member}`", _feature_name(features[member]), where))
    rows.append(("`__url__`", "string", "every sample (the shard it came from)"))
    lines += _table(("column", "type", "present in"), rows)
    lines += ["", "## Drops", "", "Rows of the inputs left out, by reason:", ""]
    drops = manifest.get("drops") or {}
    lines += _table(("reason", "rows"), sorted(drops.items())) if drops else ["none"]
    segments = manifest.get("segments") or {}
    if segments:
        reused = set(manifest.get("reused_partitions") or [])
        lines += ["", "## Partitions", ""]
        lines += _table(("partition", "samples", "shards", "drops"), [
            (f"`{name}`", seg.get("num_samples", 0),
             f"{len(seg.get('shards', []))} ({'referenced' if name in reused else 'written'})",
             ", ".join(f"{reason} {n}" for reason, n in sorted((seg.get("drops") or {}).items())) or "none")
            for name, seg in sorted(segments.items())])
    lines += ["", "## Config", "", "```yaml",
              yaml.safe_dump({"config": manifest.get("config"), "limits": manifest.get("limits"),
                              "dedup": manifest.get("dedup")}, sort_keys=True, default_flow_style=False).rstrip(),
              "```", ""]
    front = yaml.safe_dump(card_metadata(manifest), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------ older versions
def scan_json_types(version_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """member -> JSON type, read from every JSON member of the version's shards (versions written before the
    manifest recorded ``json_types``)."""
    import posixpath
    import tarfile

    from pipelines.corpus_format import open_file

    types: dict[str, Any] = {}
    for shard in manifest.get("shards", []):
        with open_file(shard_url(version_dir, shard)) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                if not member.isfile() or "." not in base:
                    continue
                name = base.split(".", 1)[1]
                if json_member(name):
                    merge_member_types(types, {name: json_type(json.loads(tar.extractfile(member).read()))},
                                       f"{shard_path(shard)}: ")
    return types


def write_dataset_card(version_dir: str, *, overwrite: bool = False) -> bool:
    """Write ``README.md`` into an existing version directory (local or URL), for versions written before the
    writer made cards; JSON types come from the manifest, else from reading the shards. Returns whether it
    wrote one."""
    from pipelines.corpora import CorpusStore

    store = CorpusStore(version_dir)
    if store.exists(CARD) and not overwrite:
        return False
    manifest = read_manifest(version_dir)
    if not manifest.get("json_types"):
        manifest = {**manifest, "json_types": scan_json_types(str(version_dir).rstrip("/"), manifest)}
    store.write_bytes(CARD, card_text(manifest).encode("utf-8"))
    return True
