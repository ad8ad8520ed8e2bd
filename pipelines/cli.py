"""Small commands around the Dagster code location (used by ``make demo``):

    python -m pipelines.cli seed-inbox   put the profile's sample batches into the inbox (once)
    python -m pipelines.cli register     add a prompt_batches partition per inbox file to the Dagster instance
    python -m pipelines.cli partitions   print the registered partition keys, one per line
    python -m pipelines.cli summary      one screen: what the last materializations wrote
    python -m pipelines.cli export-pickapic --out DIR [--corpus-dir DIR] [--drop-ties] [--tasks t2i,edit|all]
                                         [--soft-labels round|refuse]
                                         the preference corpus as a Hugging Face dataset with Pick-a-Pic v2's
                                         columns (default: the latest version under the data root, t2i pairs
                                         only, soft labels rounded to 0/0.5/1); prints a JSON summary, and what
                                         it left out on stderr
    python -m pipelines.cli check-profile [FILE|NAME]
                                         validate a profile (default: $PREFMILL_PROFILE or world) and print its
                                         resolved settings as YAML (exit 0), or each problem as
                                         `path.to.key: problem` on stderr (exit 2)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from pipelines.paths import SAMPLES_DIR, Layout, default_data_root, default_inbox


# The few final metrics per trainer worth a line on one screen (the rest are in metrics.jsonl / result.json).
SUMMARY_METRICS = ("loss", "implicit_acc", "margin", "reward_mean", "kl", "best_heldout_lambda_harmonic")


# `samples: world`: three batches like the bundled ones (12 prompts each), of the procedural world's prompts —
# one-object t2i scenes (what zoo:world_gen learned), edits and multi-reference placements
WORLD_SAMPLE_BATCHES = 3
WORLD_SAMPLE_COUNTS = {"t2i": 6, "edit": 3, "multi_ref": 3}


def seed_inbox(inbox: Path, samples: str = "bundled") -> list[Path]:
    """Put the profile's sample batches into ``inbox/samples`` once (a later call leaves them): the bundled ones
    (``samples: bundled``), or :data:`WORLD_SAMPLE_BATCHES` batches of the world's prompts (``samples: world``)."""
    target = inbox / "samples"
    if not target.exists():
        tmp = inbox / ".samples.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if samples == "world":
            from pipelines.proving_world import write_batch

            for seed in range(1, WORLD_SAMPLE_BATCHES + 1):
                write_batch(tmp / "prompts", seed, WORLD_SAMPLE_COUNTS, name=f"batch-{seed:04d}", max_objects=1)
        else:
            shutil.copytree(SAMPLES_DIR, tmp, ignore=shutil.ignore_patterns("README.md"))
        tmp.replace(target)
    return sorted(target.rglob("*.jsonl"))


def register(inbox: Path) -> list[str]:
    """Adds a partition per usable batch file and returns their keys. On stderr: ``skipped: <file>: <why>`` for
    each file that cannot be a batch (one never stops the others), and ``changed: <file>: ...`` for a registered
    file whose content differs from what its partition last ingested (the inbox sensor re-runs that partition;
    or rematerialize it). Nothing is ever registered twice under another key."""
    from dagster import DagsterInstance

    from pipelines.inbox import (batch_file_problem, content_sha256, default_limits, ingested_sha256, list_inbox,
                                 read_batch, shown)
    from pipelines.partitions import PROMPT_BATCH_PARTITIONS

    files, problems = list_inbox(str(inbox))
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    limits = default_limits()
    keys, digests = [], {}
    for key, file in sorted(files.items()):
        try:
            data = read_batch(file)
            problem = batch_file_problem(data, limits)
        except Exception as exc:  # noqa: BLE001 - one unreadable file is reported, never fatal
            problem = f"cannot be read: {type(exc).__name__}: {shown(exc)}"
        if problem:
            print(f"skipped: {shown(file.url)}: {problem}", file=sys.stderr)
        else:
            keys.append(key)
            digests[key] = content_sha256(data)
    with DagsterInstance.get() as instance:
        known = set(instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS))
        new = [k for k in keys if k not in known]
        if new:
            instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, new)
        for key in keys:
            if key not in known:
                continue
            try:
                before = ingested_sha256(instance, key)
            except Exception:  # noqa: BLE001 - no record to compare with: nothing to report
                before = None
            if before and before != digests[key]:
                print(f"changed: {shown(files[key].url)}: content sha256 {digests[key][:16]}, partition {key!r} "
                      f"ingested {before[:16]}; the inbox sensor re-runs it (or rematerialize the partition)",
                      file=sys.stderr)
    return keys


def summary(root: Path) -> str:
    import polars as pl

    from labelers.rubrics import all_dimensions
    from pipelines.catalog import finished_partitions
    from pipelines.corpus_format import latest_version, read_manifest
    from pipelines.runs import finished_result, latest_run

    layout = Layout(root)
    out = [f"prefmill — outputs under {root}", ""]
    parts = finished_partitions(layout, "candidate_images", "candidates.parquet")
    cands = sum(pl.scan_parquet(layout.candidates(p)).select(pl.len()).collect().item() for p in parts)
    out.append(f"candidates      {cands} in {len(parts)} partitions   {layout.asset_dir('candidate_images')}")
    parts = finished_partitions(layout, "reward_labels", "labels.parquet")
    if parts:
        labels = pl.concat([pl.read_parquet(layout.labels(p)) for p in parts], how="diagonal_relaxed")
        by_status = ", ".join(f"{s}={n}" for s, n in sorted(labels.group_by("status").len().iter_rows()))
        out.append(f"labels          {len(labels)} ({by_status})   {layout.asset_dir('reward_labels')}")
        ok = labels.filter(pl.col("status") == "ok")
        dims = [d for d in all_dimensions() + ["clip_t", "clip_i", "lambda_harmonic", "reward", "diversity"]
                if d in ok.columns and ok[d].null_count() < len(ok)]
        for dim in dims:
            out.append(f"  mean {dim:<22} {ok[dim].mean():.4g}")
    parts = finished_partitions(layout, "preference_pairs", "pairs.parquet")
    pairs = sum(pl.scan_parquet(layout.pairs(p)).select(pl.len()).collect().item() for p in parts)
    out.append(f"pairs           {pairs}   {layout.asset_dir('preference_pairs')}")
    for corpus in ("sft_corpus", "preference_corpus"):
        version = latest_version(layout.corpus_root(corpus))
        if version:
            manifest = read_manifest(layout.corpus_root(corpus) / version)
            out.append(f"{corpus:<15} version {version}: {manifest['num_samples']} samples in "
                       f"{len(manifest['shards'])} shards, drops {manifest['drops']}   {layout.corpus_root(corpus) / version}")
    for trainer in ("sft", "dpo", "grpo"):
        run = latest_run(layout, trainer)
        if run:
            result = finished_result(run)
            final = result.get("final_metrics", {})
            metrics = ", ".join(f"{k}={final[k]:.4g}" for k in SUMMARY_METRICS if isinstance(final.get(k), (int, float)))
            out.append(f"{trainer}_run{'':<9} {result.get('steps')} steps, {metrics}   {run}")
        evals = layout.eval_root(trainer) / run.name / "summary.json" if run else None
        if evals and evals.exists():
            s = json.loads(evals.read_text())
            out.append(f"{trainer}_eval{'':<8} win rate reward={s['win_rate_reward']}, judge={s['win_rate_judge']}, "
                       f"clip={s['win_rate_clip']}   {evals.parent}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["seed-inbox", "register", "partitions", "summary", "export-pickapic",
                                            "recover", "check-profile"])
    parser.add_argument("profile", nargs="?", default=None,
                        help="check-profile: a profile name (pipelines/profiles/<name>.yaml) or a YAML file")
    parser.add_argument("--data", default=default_data_root())
    parser.add_argument("--inbox", default=None)
    export = parser.add_argument_group("export-pickapic")
    export.add_argument("--out", default=None, help="output directory (replaced atomically)")
    export.add_argument("--corpus-dir", default=None,
                        help="a preference corpus version, or a corpus root (its latest version); default: "
                             "<data>/corpora/preference_corpus")
    export.add_argument("--rows-per-file", type=int, default=None)
    export.add_argument("--drop-ties", action="store_true", help="leave out 0.5/0.5 pairs (Diffusion-DPO)")
    export.add_argument("--tasks", default=None,
                        help="pairs of these tasks, comma-separated (default t2i: Pick-a-Pic trainers are "
                             "text-to-image; e.g. t2i,edit, or all)")
    export.add_argument("--soft-labels", choices=["round", "refuse"], default="round",
                        help="a label_0 other than 0, 0.5, 1: round it to the nearest (counted; default) or refuse "
                             "to export")
    recover = parser.add_argument_group(
        "recover", "mark the runs of this host whose processes are gone (killed: still STARTED) failed and free "
                   "their pool slots, and the slots of runs that already ended; prints JSON (every run start does "
                   "this too)")
    recover.add_argument("--dry-run", action="store_true", help="only say what recover would do")
    args = parser.parse_args(argv)
    if args.profile is not None and args.command != "check-profile":
        parser.error(f"{args.command} takes no profile argument")
    if args.command == "check-profile":
        return check_profile(args.profile)
    if args.command == "recover":
        return recover_runs(args.dry_run)
    if args.command == "export-pickapic":
        if not args.out:
            parser.error("export-pickapic needs --out DIR")
        try:
            result = export_pickapic_command(args)
        except (ValueError, FileExistsError) as e:
            print(f"export-pickapic: {e}", file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2))
        print(export_report(result), file=sys.stderr)
        return 0
    inbox = Path(args.inbox or default_inbox(args.data))
    if args.command == "seed-inbox":
        from pipelines.profiles import load_profile

        for path in seed_inbox(inbox, load_profile()["samples"]):
            print(path)
    elif args.command in ("register", "partitions"):
        keys = register(inbox) if args.command == "register" else _registered()
        print("\n".join(keys))
    else:
        print(summary(Path(args.data)))
    return 0


def check_profile(name_or_path: str | None) -> int:
    """``check-profile``: the profile's resolved settings (after ``extends:``, defaults filled in) as YAML on
    stdout and exit 0; its problems on stderr and exit 2."""
    import yaml

    from pipelines.profiles import ProfileError, load_profile, profile_path, selected_profile

    try:
        path = profile_path(selected_profile(name_or_path))
        settings = load_profile(str(path))
    except ProfileError as exc:
        print(f"check-profile: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable file, YAML syntax error
        print(f"check-profile: {name_or_path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"# {path}: valid; resolved settings (extends merged, defaults filled in)")
    print(yaml.safe_dump(settings, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True), end="")
    return 0


def recover_runs(dry_run: bool = False) -> int:
    """``recover``: :func:`pipelines.recovery.recover_command` on the instance at ``$DAGSTER_HOME``."""
    from pipelines.recovery import recover_command

    return recover_command(dry_run=dry_run)


def export_pickapic_command(args: argparse.Namespace) -> dict:
    from pipelines.export import DEFAULT_TASKS, ROWS_PER_FILE, export_pickapic

    corpus = args.corpus_dir or os.fspath(Layout(args.data).corpus_root("preference_corpus"))
    if not args.tasks:
        tasks = DEFAULT_TASKS
    elif args.tasks.strip() == "all":
        tasks = None
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return export_pickapic(corpus, args.out, rows_per_file=args.rows_per_file or ROWS_PER_FILE,
                           drop_ties=args.drop_ties, tasks=tasks, soft_labels=args.soft_labels)


def export_report(summary: dict) -> str:
    """One line of what the export wrote and left out, then its notes."""
    left_out = ", ".join(f"{reason}={n}" for reason, n in summary["left_out"].items()) or "nothing"
    lines = [f"exported {summary['rows']} pairs to {summary['out_dir']}; left out: {left_out}; "
             f"soft labels rounded: {summary['soft_label_rounded']}"]
    return "\n".join(lines + [f"note: {note}" for note in summary["notes"]])


def _registered() -> list[str]:
    from dagster import DagsterInstance

    from pipelines.partitions import PROMPT_BATCH_PARTITIONS

    with DagsterInstance.get() as instance:
        return sorted(instance.get_dynamic_partitions(PROMPT_BATCH_PARTITIONS))


if __name__ == "__main__":
    sys.exit(main())
