"""candidate_images: K seeded candidates per prompt, batched through diffusers, stored in WebDataset shards."""


import dagster as dg

from assets._metadata import counts_md, path_md
from assets.prompts import prompt_batches
from pipelines.partitions import prompt_batch_partitions
from pipelines.resources import GeneratorResource, ProfileResource, StorageResource


@dg.asset(partitions_def=prompt_batch_partitions, deps=[prompt_batches], group_name="generation",
          kinds={"diffusers", "webdataset"}, pool="gpu",
          # transient failures (a preempted node, a flaky filesystem) retry; finished shards are kept, so a retry
          # resumes. Out-of-memory is handled inside, by halving the batch.
          retry_policy=dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL))
def candidate_images(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                     generator: GeneratorResource) -> dg.MaterializeResult:
    """Generates ``seeds_per_prompt`` candidates per prompt with the profile's generator for its task. Shards are
    written whole and atomically; a re-run after a crash generates only what is missing."""
    import polars as pl
    from PIL import Image

    from pipelines.candidates import generate_partition, plan_candidates, reference_grid
    from pipelines.generation import GenerationRequest
    from pipelines.io import write_parquet

    key = context.partition_key
    layout = storage.layout
    settings = profile.settings()["generation"]
    prompts = pl.read_parquet(layout.prompts(key))
    prompts_by_id = {row["prompt_id"]: row for row in prompts.iter_rows(named=True)}
    tasks = sorted(set(prompts["task"].to_list()))
    specs = {task: generator.generator_spec(task) for task in tasks}
    gens = {task: generator.for_task(task) for task in tasks}
    plan = plan_candidates(
        prompts.to_dicts(),
        {task: {"generator_id": gens[task].generator_id, "params": gens[task].params} for task in tasks},
        settings["seeds_per_prompt"], settings.get("base_seed", 0),
    )

    def source_for(prompt: dict) -> tuple[Image.Image | None, tuple]:
        """``(source image, native reference images)`` of a prompt for its task's generator."""
        spec = specs[prompt["task"]]
        if prompt["task"] == "edit":
            with Image.open(prompt["source_image"]) as img:
                return img.convert("RGB"), ()
        if prompt["task"] == "multi_ref" and prompt["reference_images"]:
            refs = []
            for path in prompt["reference_images"]:
                with Image.open(path) as img:
                    refs.append(img.convert("RGB"))
            if gens["multi_ref"].reference_input == "native":  # several input images (Qwen-Image-Edit-Plus, Kontext)
                return None, tuple(refs)
            # the fallback for single-image edit models, recorded as params.reference_input = "grid"
            return reference_grid(refs, spec.get("width", 512), spec.get("height", 512)), ()
        return None, ()

    def make_requests(chunk: list[dict]) -> dict[str, list]:
        grouped: dict[str, list] = {}
        sources: dict[str, tuple] = {}
        for cand in chunk:
            prompt = prompts_by_id[cand["prompt_id"]]
            if prompt["prompt_id"] not in sources:
                sources[prompt["prompt_id"]] = source_for(prompt)
            grouped.setdefault(prompt["task"], []).append(GenerationRequest(
                key=cand["candidate_id"], text=prompt["text"], seed=cand["seed"],
                source_image=sources[prompt["prompt_id"]][0], reference_images=sources[prompt["prompt_id"]][1]))
        return grouped

    shard_dir = layout.asset_dir("candidate_images", key) / "shards"
    table, generated = generate_partition(plan, prompts_by_id, make_requests,
                                          lambda task, requests: gens[task].generate(requests),
                                          shard_dir, settings.get("shard_size", 256), context.log.info)
    path = write_parquet(table, layout.candidates(key))
    by_generator = dict(table.group_by("generator_id").len().iter_rows())
    return dg.MaterializeResult(metadata={
        "num_candidates": len(table),
        "generated_now": generated,
        "reused": len(table) - generated,
        "num_shards": len(list(shard_dir.glob("*.tar"))),
        "by_generator": counts_md(by_generator, "generator_id"),
        "path": path_md(path),
        "shards": path_md(shard_dir),
    })
