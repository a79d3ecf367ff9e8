"""``distillrank cache``: look into the teacher's call cache, and remove records from it.

``stats`` prints one row per cache folder under ``paths.teacher_cache`` (a teach target's, or a synthesize
target's under ``_synthesize/``): shards, records, keys by state, torn lines, tokens paid and bytes on disk.

``purge --target T`` removes every record of the keys that match (``--status``: the key's state, ``ok``,
``unusable`` or ``error``; ``--model``; ``--template``: a prefix of the template hash) and says how many went.
The next run asks those calls again (and pays for them). Run it while no stage writes to the folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from pipeline.config import DEFAULT_PARAMS_FILE, ConfigError, load_params
from pipeline.teacher.cache import SHARD_GLOB, KeyState, TeacherCache, read_shard, shard_paths


def cache_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` that holds shards (``trec-dl-2019``, ``_synthesize/scifact``, ...)."""
    return sorted({path.parent for path in root.rglob(SHARD_GLOB)})


def folder_stats(root: Path, folder: Path) -> dict[str, object]:
    """One row of ``distillrank cache stats``."""
    cache = TeacherCache(folder)
    stats = cache.stats()
    states = list(cache.key_states().values())
    records = [record for path in shard_paths(folder) for record in read_shard(path).records]
    return {
        "target": folder.relative_to(root).as_posix(),
        "shards": stats.shards,
        "records": stats.records,
        "ok keys": states.count("ok"),
        "unusable keys": states.count("unusable"),
        "error keys": states.count("error"),
        "torn lines": stats.torn_lines,
        "prompt tokens": sum(r.prompt_tokens for r in records),
        "completion tokens": sum(r.completion_tokens for r in records),
        "MiB": round(sum(path.stat().st_size for path in shard_paths(folder)) / 2**20, 2),
    }


def matching_keys(cache: TeacherCache, status: KeyState | None, model: str | None, template: str | None) -> set[str]:
    """The keys of ``cache`` whose state is ``status`` and whose records are of ``model`` / a template hash that
    starts with ``template`` (None: any)."""
    states = cache.key_states()
    keys = {key for key, state in states.items() if status is None or state == status}
    if model is None and template is None:
        return keys
    described = {
        record.key: record
        for path in shard_paths(cache.folder)
        for record in read_shard(path).records
        if record.key in keys
    }
    return {
        key
        for key, record in described.items()
        if (model is None or record.model == model) and (template is None or record.template_hash.startswith(template))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distillrank cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("stats", help="shards, records, keys by state, tokens and size of every cache folder")
    purge = commands.add_parser("purge", help="remove the records of matching keys (asked again next run)")
    purge.add_argument("--target", required=True, help="a folder under paths.teacher_cache, e.g. trec-dl-2019")
    purge.add_argument("--status", choices=("ok", "unusable", "error"), help="only keys in this state")
    purge.add_argument("--model", help="only records of this model")
    purge.add_argument("--template", help="only records whose template hash starts with this")
    purge.add_argument("--dry-run", action="store_true", help="say how many would go, remove nothing")
    args = parser.parse_args(argv)
    try:
        root = Path(load_params(args.params).paths.teacher_cache)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "stats":
        rows = [folder_stats(root, folder) for folder in cache_folders(root)]
        print(tabulate(rows, headers="keys") if rows else f"no call cache under {root}")
        return 0
    folder = root / args.target
    if folder not in cache_folders(root):
        known = [f.relative_to(root).as_posix() for f in cache_folders(root)]
        print(f"error: --target {args.target!r}: no call cache at {folder} (targets here: {known})", file=sys.stderr)
        return 2
    with TeacherCache(folder) as cache:
        keys = matching_keys(cache, args.status, args.model, args.template)
        if args.dry_run:
            print(f"{folder}: {len(keys)} keys match; nothing removed (--dry-run)")
            return 0
        removed = cache.purge(keys)
    print(f"{folder}: removed {removed} records of {len(keys)} keys; the next run asks them again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
