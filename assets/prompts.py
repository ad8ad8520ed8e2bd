"""prompt_batches: one partition per inbox batch file, validated into the prompts table."""


import dagster as dg

from assets._metadata import counts_md, path_md, table_md
from pipelines.partitions import prompt_batch_partitions
from pipelines.resources import StorageResource


class PromptBatchConfig(dg.Config):
    inbox: str = ""  # defaults to the storage resource's inbox (PREFMILL_INBOX or <data>/inbox)


@dg.asset(partitions_def=prompt_batch_partitions, group_name="generation", kinds={"parquet"})
def prompt_batches(context: dg.AssetExecutionContext, config: PromptBatchConfig,
                   storage: StorageResource) -> dg.MaterializeResult:
    """Reads the partition's JSONL batch from the inbox, validates every row and copies its images into the
    partition under their content hash. Bad rows are dropped and counted by reason; the batch fails only when
    no row is usable."""
    from pipelines.inbox import list_inbox, stage_batch
    from pipelines.io import write_json, write_parquet
    from pipelines.prompts import ingest_prompt_file, prompts_frame

    key = context.partition_key
    inbox = config.inbox or storage.inbox_dir
    files, problems = list_inbox(inbox)
    if key not in files:
        raise dg.Failure(f"partition {key!r}: no batch file {key}.jsonl under the inbox {inbox}"
                         + (f" ({'; '.join(problems)})" if problems else ""),
                         metadata={"inbox": inbox, "known": sorted(files)[:50]})
    out_dir = storage.layout.asset_dir("prompt_batches", key)
    source = files[key].url
    local_file = stage_batch(files[key], out_dir / "staging")  # a remote inbox is copied here first
    result = ingest_prompt_file(local_file, out_dir / "images")
    for problem in result.problems[:50]:
        context.log.warning(f"{source}: {problem}")
    write_json({"source": source, "drops": dict(result.drops), "problems": result.problems},
               out_dir / "rejects.json")
    if not result.rows:
        raise dg.Failure(f"{source}: no usable prompt rows ({sum(result.drops.values())} dropped)",
                         metadata={"drops": counts_md(result.drops), "problems": "\n".join(result.problems[:20])})
    table = prompts_frame(result.rows)
    path = write_parquet(table, storage.layout.prompts(key))
    by_task = dict(table.group_by("task").len().iter_rows())
    by_split = dict(table.group_by("split").len().iter_rows())
    return dg.MaterializeResult(metadata={
        "num_prompts": len(table),
        "dropped": sum(result.drops.values()),
        "drops_by_reason": counts_md(result.drops),
        "by_task": counts_md(by_task, "task"),
        "by_split": counts_md(by_split, "split"),
        "source": source,
        "path": path_md(path),
        "preview": table_md(table.select("prompt_id", "task", "split", "text").head(8)),
    })
