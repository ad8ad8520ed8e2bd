"""Reading a trainer's config: a dataclass (``trainers.config.LoRATrainingConfig`` and each ``<algo>_config.py``)
from JSON or YAML (``python -m trainers.<algo> --config FILE [--set KEY=VALUE]``), unknown keys rejected, and the
fingerprint a resumed run must match. yaml is imported inside functions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def _read_mapping(path: str | os.PathLike) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except ValueError:
            import yaml

            data = yaml.safe_load(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def _numeric_kind(hint: Any) -> type | None:
    """``float`` or ``int`` when a field is typed as that number (or that number or None), else None."""
    import types
    import typing

    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (float, int) else None


def _coerce_numbers(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a numeric field given a string is converted, or refused by
    name, instead of failing later inside torch with a type error that names neither."""
    import typing

    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        kind = _numeric_kind(hints.get(key))
        if kind is None or not isinstance(value, str):
            continue
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"{cls.__name__}.{key} must be a number, got {value!r}") from None
        if kind is int and not number.is_integer():
            raise ValueError(f"{cls.__name__}.{key} must be an integer, got {value!r}")
        out[key] = int(number) if kind is int else number
    return out


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build the dataclass ``cls`` from ``data``; unknown keys are an error (catches typos in config files), and
    numbers written as strings (YAML's ``1e-4``) become numbers."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**_coerce_numbers(cls, data))


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Read a JSON/YAML file into the dataclass ``cls`` (``overrides`` win over the file)."""
    data = _read_mapping(path) if path else {}
    data.update(overrides or {})
    return config_from_dict(cls, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def coerce_config(cls: type[C], cfg: C | dict[str, Any] | str | os.PathLike) -> C:
    """Accept a config instance, a dict, or a path to a JSON/YAML file."""
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, dict):
        return config_from_dict(cls, dict(cfg))
    return load_config(cls, cfg)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    import yaml

    return key.strip(), yaml.safe_load(raw)


def cli_main(cls: type[C], train_fn, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python -m trainers.<algo> --config FILE [--set key=value ...]``: parse, train, print ``result.json``."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--config", required=False, help="JSON or YAML file with the config fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (YAML-parsed value); repeatable")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("PREFMILL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(cls, args.config, dict(_parse_override(o) for o in args.overrides))
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    result = train_fn(cfg)
    print(json.dumps(result, indent=2, default=str))
    return 0


RESUME_NEUTRAL_FIELDS = frozenset(
    {"max_steps", "num_steps", "checkpoint_every", "keep_checkpoints", "output_dir", "resume", "heldout_every",
     "device", "mixed_precision", "num_threads", "prefetch_factor"}
)


def config_fingerprint(cfg: Any, neutral: frozenset[str] = RESUME_NEUTRAL_FIELDS) -> tuple[str, dict[str, Any]]:
    """Hash of the fields that must match for a resume (step counts and bookkeeping fields excluded)."""
    data = {k: v for k, v in config_to_dict(cfg).items() if k not in neutral}
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32], data
