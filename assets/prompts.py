"""prompt_batches: one partition per inbox batch file, validated into the prompts table."""

import dataclasses

import dagster as dg

from assets._metadata import counts_md, path_md, table_md
from pipelines.partitions import prompt_batch_partitions
from pipelines.resources import ProfileResource, StorageResource


class PromptBatchConfig(dg.Config):
    inbox: str = ""  # defaults to the storage resource's inbox (PREFMILL_INBOX or <data>/inbox)


def _other_partitions_splits(layout, key: str, log) -> dict[str, tuple[str, str]]:
    """prompt_id -> (split, partition) of every other partition already on disk, so no prompt lands in both splits
    across batches either. A partition that cannot be read is skipped with a warning."""
    import polars as pl

    known: dict[str, tuple[str, str]] = {}
    root = layout.asset_dir("prompt_batches")
    if not root.is_dir():
        return known
    own = layout.asset_dir("prompt_batches", key)
    for table in sorted(root.glob("*/prompts.parquet")):
        if table.parent == own:
            continue
        try:
            frame = pl.read_parquet(table, columns=["prompt_id", "split"])
        except Exception as exc:  # noqa: BLE001 - another partition's damage is not this one's failure
            log.warning(f"split check: {table} cannot be read ({type(exc).__name__}: {exc}); skipped")
            continue
        for prompt_id, split in frame.iter_rows():
            known.setdefault(prompt_id, (split, f"partition {table.parent.name}"))
    return known


@dg.asset(partitions_def=prompt_batch_partitions, group_name="generation", kinds={"parquet"})
def prompt_batches(context: dg.AssetExecutionContext, config: PromptBatchConfig,
                   storage: StorageResource, profile: ProfileResource) -> dg.MaterializeResult:
    """Reads the partition's JSONL batch from the inbox, validates every row and copies its images into the
    partition under their content hash. Bad rows are dropped and counted by reason (``rejects.json`` lists each
    with its line number); the batch fails only when the file cannot be read or no row is usable. The profile's
    ``inputs`` section bounds images, lines and text."""
    from pipelines.inbox import list_inbox, shown, stage_batch
    from pipelines.io import write_json, write_parquet
    from pipelines.profiles import input_limits
    from pipelines.prompts import PromptFileError, ingest_prompt_file, prompts_frame

    key = context.partition_key
    inbox = config.inbox or storage.inbox_dir
    limits = input_limits(profile.settings())
    files, problems = list_inbox(inbox)
    if key not in files:
        raise dg.Failure(f"partition {key!r}: no usable batch file for it under the inbox {shown(inbox)}"
                         f" (no batch file {key}.jsonl)" + (f" ({'; '.join(problems)})" if problems else ""),
                         metadata={"inbox": shown(inbox), "known": sorted(files)[:50]})
    out_dir = storage.layout.asset_dir("prompt_batches", key)
    from pipelines.io import remove_stale_temps

    for folder in (out_dir, out_dir / "images"):  # temps a killed earlier attempt left behind
        remove_stale_temps(folder, log=context.log.info)
    source = shown(files[key].url)
    local_file, root = stage_batch(files[key], out_dir / "staging", limits)  # a remote inbox is copied here first
    try:
        result = ingest_prompt_file(local_file, out_dir / "images", root=root, limits=limits,
                                    known_splits=_other_partitions_splits(storage.layout, key, context.log))
    except PromptFileError as exc:
        raise dg.Failure(f"{source}: the batch file cannot be used: {shown(exc)}",
                         metadata={"source": source}) from exc
    for problem in result.problems[:50]:
        context.log.warning(f"{source}: {problem}")
    if len(result.problems) > 50:
        context.log.warning(f"{source}: {len(result.problems) - 50} more dropped rows, see rejects.json")
    dropped = sum(result.drops.values())
    write_json({"source": source, "source_sha256": result.sha256, "lines": result.lines, "kept": len(result.rows),
                "drops": dict(result.drops), "problems": result.problems, "rejected": result.rejected,
                "limits": dataclasses.asdict(limits)},
               out_dir / "rejects.json")
    if not result.rows:
        raise dg.Failure(f"{source}: no usable prompt rows ({dropped} dropped)",
                         metadata={"drops": counts_md(result.drops), "problems": "\n".join(result.problems[:20])})
    table = prompts_frame(result.rows)
    path = write_parquet(table, storage.layout.prompts(key))
    by_task = dict(table.group_by("task").len().iter_rows())
    by_split = dict(table.group_by("split").len().iter_rows())
    return dg.MaterializeResult(metadata={
        "num_prompts": len(table),
        "dropped": dropped,
        "drops_by_reason": counts_md(result.drops),
        "rejected_lines": dg.MetadataValue.md(
            "\n".join(["| line | reason | detail |", "| --- | --- | --- |"]
                      + [f"| {r['line']} | {r['reason']} | {r['detail'][:120].replace('|', '/')} |"
                         for r in result.rejected[:20]])
            if result.rejected else "_none_"),
        "by_task": counts_md(by_task, "task"),
        "by_split": counts_md(by_split, "split"),
        "source": source,
        "source_sha256": result.sha256,
        "path": path_md(path),
        "preview": table_md(table.select("prompt_id", "task", "split", "text").head(8)),
    })
