"""Evaluating a trained adapter: generate on held-out prompts with the base and the trained weights (same seeds),
label both with the same stage, and compare: mean reward per dimension and win rates."""

from __future__ import annotations

from typing import Any


def eval_requests(prompts: list[dict[str, Any]], seeds: int, base_seed: int = 1000,
                  references: dict | None = None, reference_input: str | None = None):
    """Requests for each prompt and seed; a multi_ref prompt's references (``references[prompt_id]``: PIL images)
    go in natively (``reference_input == "native"``) or as a grid source image (``"grid"``)."""
    from labelers.hashing import content_id
    from pipelines.candidates import reference_grid
    from pipelines.generation import GenerationRequest

    requests, rows = [], []
    for prompt in prompts:
        refs = tuple((references or {}).get(prompt["prompt_id"]) or ())
        source, native = None, ()
        if prompt.get("task") == "multi_ref" and refs and reference_input == "native":
            native = refs
        elif prompt.get("task") == "multi_ref" and refs and reference_input == "grid":
            source = reference_grid(list(refs), refs[0].width, refs[0].height)
        for index in range(seeds):
            seed = base_seed + index
            key = content_id("eval", prompt["prompt_id"], seed)
            requests.append(GenerationRequest(key=key, text=prompt["text"], seed=seed, source_image=source,
                                              reference_images=native))
            rows.append({"candidate_id": key, "prompt_id": prompt["prompt_id"], "task": prompt["task"],
                         "text": prompt["text"], "seed": seed})
    return requests, rows


def evaluate_adapter(generator, stage, prompts: list[dict[str, Any]], adapter_dir: str, seeds: int,
                     sources: dict, references: dict, batch_size: int = 8):
    """Returns (per-image label table with a ``weights`` column, summary dict)."""
    import polars as pl

    requests, rows = eval_requests(prompts, seeds, references=references,
                                   reference_input=getattr(generator, "reference_input", None))
    base_images = generator.generate(requests)
    generator.load_lora(adapter_dir)
    try:
        trained_images = generator.generate(requests)
    finally:
        generator.unload_lora()
    tables = []
    for weights, images in (("base", base_images), ("trained", trained_images)):
        labelled: list[dict[str, Any]] = []
        for start in range(0, len(rows), batch_size):
            batch = [{**r, "judge_id": stage.judge_id_for(r["task"])} for r in rows[start:start + batch_size]]
            batch_images = {r["candidate_id"]: images[start + i] for i, r in enumerate(batch)}
            labelled.extend(stage.process_batch(batch, batch_images, sources, references))
        tables.append(pl.DataFrame(labelled, infer_schema_length=None).with_columns(
            pl.lit(weights).alias("weights"), pl.Series("seed", [r["seed"] for r in rows])))
    table = pl.concat(tables, how="diagonal_relaxed")
    return table, summarize(table)


def summarize(table) -> dict[str, Any]:
    import polars as pl

    from labelers.rubrics import all_dimensions

    dims = [d for d in all_dimensions() if d in table.columns]
    metrics = dims + ["clip_t", "clip_i", "lambda_harmonic", "reward"]
    ok = table.filter(pl.col("status") == "ok")
    means = {}
    for weights in ("base", "trained"):
        part = ok.filter(pl.col("weights") == weights)
        means[weights] = {m: (float(part[m].mean()) if m in part.columns and part[m].null_count() < len(part) else None)
                          for m in metrics}
    judge_mean = pl.mean_horizontal([pl.col(d) for d in dims]) if dims else pl.lit(None)
    paired = (ok.with_columns(judge_mean.alias("judge_mean"))
              .select("prompt_id", "seed", "weights", "reward", "judge_mean", "lambda_harmonic")
              .pivot(on="weights", index=["prompt_id", "seed"], values=["reward", "judge_mean", "lambda_harmonic"]))

    def win_rate(metric: str) -> float | None:
        a, b = f"{metric}_trained", f"{metric}_base"
        if a not in paired.columns or b not in paired.columns:
            return None
        both = paired.filter(pl.col(a).is_not_null() & pl.col(b).is_not_null())
        if not len(both):
            return None
        wins = (both[a] > both[b]).cast(pl.Float64) + 0.5 * (both[a] == both[b]).cast(pl.Float64)
        return float(wins.mean())

    return {
        "num_images": len(table),
        "num_ok": len(ok),
        "mean": means,
        "win_rate_reward": win_rate("reward"),
        "win_rate_judge": win_rate("judge_mean"),
        "win_rate_clip": win_rate("lambda_harmonic"),
    }
