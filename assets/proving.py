"""The proving ground (``make prove``): the recipes the main graph does not train, and the report that measures
every recipe with the verifier on held-out prompts.

* ``grpo_base_run``: GRPO from the base model (the main graph's ``grpo_run`` starts from the SFT adapter).
* ``dpo_shuffled_run``: control — DPO on the same preference corpus with half the labels swapped (no preference).
* ``grpo_verifier_run``: control — GRPO from the base with the verifier as the reward (an upper bound on labels).
* ``proving_report``: base and every recipe (final adapter and each kept checkpoint) on the held-out prompts:
  verifier accuracy with a 95 % bootstrap interval, CLIP-T, CLIP-I, an accuracy-vs-steps plot, and the
  ``prove:`` line. See :mod:`pipelines.proving`.
"""

import json

import dagster as dg

from assets._metadata import path_md
from assets.corpora import preference_corpus
from assets.pool import rl_prompt_pool
from assets.training import LONG_RUN, _launch, _train_on_corpus, dpo_run, grpo_run, grpo_settings, sft_run
from pipelines.resources import ClipResource, GeneratorResource, ProfileResource, StorageResource

SHUFFLED_LABEL_FLIP = 0.5


@dg.asset(deps=[rl_prompt_pool], group_name="proving", kinds={"pytorch", "peft"}, pool="gpu",
          op_tags=LONG_RUN)
def grpo_base_run(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                  pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """GRPO from the base model with the profile's CLIP reward (the recipe without DyRef's SFT stage)."""
    inputs, config = grpo_settings(storage, profile, init_adapter=None)
    return _launch(context, pipes_subprocess_client, storage, "grpo", inputs, config, run_name="grpo_base")


@dg.asset(deps=[preference_corpus], group_name="proving", kinds={"pytorch", "peft"}, pool="gpu")
def dpo_shuffled_run(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                     pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """Control: DPO exactly as ``dpo_run`` but with each pair's labels swapped with probability 0.5 (seeded per
    pair): what training on pairs alone, without their preference, does to the model."""
    return _train_on_corpus(context, pipes_subprocess_client, storage, profile, "dpo", "preference_corpus",
                            run_name="dpo_shuffled", label_flip=SHUFFLED_LABEL_FLIP)


@dg.asset(deps=[rl_prompt_pool], group_name="proving", kinds={"pytorch", "peft"}, pool="gpu",
          op_tags=LONG_RUN)
def grpo_verifier_run(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                      pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """Control: GRPO from the base with the verifier's share of true facts as the reward (what perfect labels buy)."""
    inputs, config = grpo_settings(storage, profile, init_adapter=None, reward="verifier")
    return _launch(context, pipes_subprocess_client, storage, "grpo", inputs, config, run_name="grpo_verifier")


PROVING_RUNS = [sft_run, dpo_run, grpo_run, grpo_base_run, dpo_shuffled_run, grpo_verifier_run]


@dg.asset(deps=PROVING_RUNS, group_name="proving", kinds={"parquet"}, pool="gpu")
def proving_report(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                   generator: GeneratorResource, clip: ClipResource) -> dg.MaterializeResult:
    """Every recipe against the base on the held-out prompts, checked by the verifier (never the training reward):
    accuracy with its 95 % bootstrap interval, CLIP-T, CLIP-I, accuracy against training steps, the ``prove:``
    line."""
    import base64

    import polars as pl

    from assets.labels import VERIFIER_AGREEMENT_FILE
    from assets.pool import RL_TASKS
    from assets.training import training_model
    from pipelines.catalog import finished_partitions, load_prompts
    from pipelines.io import write_json, write_parquet
    from pipelines.proving import (RECIPES, evaluate_weights, labels_line, plot_curves, pooled_label_agreement,
                                   prove_line, summary_table)
    from pipelines.runs import latest_run

    layout = storage.layout
    settings = profile.settings()
    prompts = load_prompts(layout, finished_partitions(layout, "prompt_batches", "prompts.parquet"))
    heldout = prompts.filter((pl.col("split") == "heldout") & pl.col("task").is_in(list(RL_TASKS)))
    heldout = heldout.head(settings["eval"]["max_prompts"]).to_dicts()
    if not heldout:
        raise dg.Failure("proving_report: no held-out prompts in any batch")
    seeds = int(settings["eval"]["seeds_per_prompt"])
    gen = generator.for_model(training_model(settings))
    if gen.reference_input is None:
        heldout = [r for r in heldout if r["task"] != "multi_ref"]
    scorer = clip.scorer()
    out = layout.asset_dir("proving_report")
    results: dict[str, dict] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    tables = []

    def record(name: str, res: dict, steps: int) -> None:
        results[name] = {k: v for k, v in res.items() if not k.startswith("_") and k not in ("rows",)}
        results[name]["steps"] = steps
        tables.append(pl.DataFrame(res["rows"]).with_columns(pl.lit(name).alias("recipe")))

    base = evaluate_weights(gen, scorer, heldout, seeds)
    record("base", base, 0)
    context.log.info(f"proving_report: base accuracy {base['accuracy']:.3f} on {len(heldout)} prompts x {seeds}")
    for name, (run_name, _about) in RECIPES.items():
        run = latest_run(layout, run_name)
        if run is None:
            context.log.warning(f"proving_report: no finished {run_name} run; {name} left out")
            continue
        result = json.loads((run / "result.json").read_text())
        adapter = result.get("best_adapter_path") or result["adapter_path"]
        res = evaluate_weights(gen, scorer, heldout, seeds, adapter=adapter, base_images=base["_images"])
        record(name, res, int(result.get("steps", 0)))
        curve = [(0, base["accuracy"])]
        for ckpt in sorted((run / "checkpoints").glob("step-*/adapter")):
            step = int(ckpt.parent.name.split("-")[1])
            if step < int(result.get("steps", 0)):
                curve.append((step, evaluate_weights(gen, scorer, heldout, seeds, adapter=str(ckpt))["accuracy"]))
        curve.append((int(result.get("steps", 0)), res["accuracy"]))
        curves[name] = sorted(set(curve))
        context.log.info(f"proving_report: {name} accuracy {res['accuracy']:.3f} "
                         f"[{res['ci_low']:.3f}, {res['ci_high']:.3f}]")
    table = summary_table(results)
    line = prove_line(results)
    # how much the labels could teach: without this a flat table cannot tell weak labels from weak trainers
    label_agreement = pooled_label_agreement([
        json.loads(path.read_text()) for key in finished_partitions(layout, "prompt_batches", "prompts.parquet")
        if (path := layout.asset_dir("reward_labels", key) / VERIFIER_AGREEMENT_FILE).exists()])
    labels = labels_line(label_agreement)
    plot_path = out / "accuracy_vs_steps.png"
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, base["accuracy"], plot_path)
    write_parquet(pl.concat(tables, how="diagonal_relaxed"), out / "images.parquet")
    write_json({"results": results, "curves": curves, "prove": line, "prompts": len(heldout),
                "seeds_per_prompt": seeds, "label_agreement": label_agreement}, out / "report.json")
    (out / "report.md").write_text(table + "\n\n" + labels + "\n\n" + line + "\n")
    context.log.info(labels)
    context.log.info(line)
    png = base64.b64encode(plot_path.read_bytes()).decode()
    return dg.MaterializeResult(metadata={
        "prove": line,
        "labels_vs_verifier": labels,
        "table": dg.MetadataValue.md(table),
        "accuracy_vs_steps": dg.MetadataValue.md(f"![accuracy vs steps](data:image/png;base64,{png})"),
        "plot": path_md(plot_path),
        "base_accuracy": float(base["accuracy"]),
        "num_prompts": len(heldout),
        "path": path_md(out),
    })


PROVING_ASSETS = [grpo_base_run, dpo_shuffled_run, grpo_verifier_run, proving_report]
