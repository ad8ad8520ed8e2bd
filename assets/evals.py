"""sft_eval, dpo_eval, grpo_eval: each trained adapter against the base on held-out prompts."""


import dagster as dg

from assets._metadata import path_md
from assets.pool import RL_TASKS
from assets.training import dpo_run, grpo_run, sft_run
from pipelines.resources import ClipResource, GeneratorResource, JudgeResource, ProfileResource, StorageResource


def build_eval_asset(run_asset: dg.AssetsDefinition, trainer: str) -> dg.AssetsDefinition:
    @dg.asset(name=f"{trainer}_eval", deps=[run_asset], group_name="evaluation", kinds={"parquet"}, pool="gpu")
    def _eval(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
              generator: GeneratorResource, judge: JudgeResource, clip: ClipResource) -> dg.MaterializeResult:
        import json

        import polars as pl
        from PIL import Image

        from pipelines.catalog import finished_partitions, load_prompts
        from pipelines.evaluation import evaluate_adapter
        from pipelines.io import write_json, write_parquet
        from pipelines.runs import latest_run

        layout = storage.layout
        settings = profile.settings()
        run = latest_run(layout, trainer)
        if run is None:
            raise dg.Failure(f"{trainer}_eval: no finished {trainer} run; materialize {trainer}_run first")
        result = json.loads((run / "result.json").read_text())
        adapter = result.get("best_adapter_path") or result["adapter_path"]
        prompts = load_prompts(layout, finished_partitions(layout, "prompt_batches", "prompts.parquet"))
        heldout = prompts.filter((pl.col("split") == "heldout") & pl.col("task").is_in(list(RL_TASKS)))
        heldout = heldout.head(settings["eval"]["max_prompts"])
        if not len(heldout):
            raise dg.Failure(f"{trainer}_eval: no held-out prompts of tasks {RL_TASKS} in any batch")

        def load(path):
            with Image.open(path) as img:
                return img.convert("RGB")

        rows = heldout.to_dicts()
        references = {r["prompt_id"]: [load(p) for p in r["reference_images"]] for r in rows}
        sources = {r["prompt_id"]: None for r in rows}
        from pipelines.stages import labeling_stage_from_profile

        stage = labeling_stage_from_profile(settings["rewards"], judge=judge.judge(), scorer=clip.scorer(),
                                            preference_scorer=clip.preference_scorer())
        from assets.training import training_model

        eval_generator = generator.for_model(training_model(settings))  # the model the adapter was trained on
        if eval_generator.reference_input is None:  # a text-only model cannot condition on references
            rows = [r for r in rows if r["task"] != "multi_ref"]
            if not rows:
                raise dg.Failure(f"{trainer}_eval: the trained model takes no input images and every held-out "
                                 "prompt is multi_ref")
        table, summary = evaluate_adapter(eval_generator, stage, rows, adapter,
                                          settings["eval"]["seeds_per_prompt"], sources, references)
        out = layout.eval_root(trainer) / run.name
        write_parquet(table.drop("raw_judgement", strict=False), out / "results.parquet")
        write_json({"run": str(run), "adapter": adapter, **summary}, out / "summary.json")
        lines = ["| metric | base | trained |", "| --- | --- | --- |"]
        for metric, base in summary["mean"]["base"].items():
            trained = summary["mean"]["trained"].get(metric)
            if base is not None or trained is not None:
                lines.append(f"| {metric} | {base if base is None else round(base, 4)} | "
                             f"{trained if trained is None else round(trained, 4)} |")
        context.log.info(f"{trainer}_eval: win rate (reward) {summary['win_rate_reward']}")
        return dg.MaterializeResult(metadata={
            "num_prompts": len(heldout),
            "num_images": summary["num_images"],
            "win_rate_reward": summary["win_rate_reward"],
            "win_rate_judge": summary["win_rate_judge"],
            "win_rate_clip": summary["win_rate_clip"],
            "mean_by_dimension": dg.MetadataValue.md("\n".join(lines)),
            "path": path_md(out),
        })

    return _eval


sft_eval = build_eval_asset(sft_run, "sft")
dpo_eval = build_eval_asset(dpo_run, "dpo")
grpo_eval = build_eval_asset(grpo_run, "grpo")
