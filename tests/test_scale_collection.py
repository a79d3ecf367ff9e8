"""The synthetic-scale collection generator (bench/scale_collection.py) and the scale bench's harness."""

from __future__ import annotations

import json
import sys
import tracemalloc
import types
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import scale, scale_collection  # noqa: E402
from bench.scale_collection import ScaleCollectionError, write_collection  # noqa: E402
from pipeline.config import Bm25Config, IndexConfig  # noqa: E402
from pipeline.lucene import bm25_search, build_index  # noqa: E402
from pipeline.sources import load_beir_folder  # noqa: E402

DL19 = REPO.parent / "shared" / "data" / "trec-dl-2019" / "corpus.jsonl"


@pytest.fixture(scope="module")
def seed_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 2,000 real TREC-DL 2019 passages: a real vocabulary and length distribution, quick to fit."""
    path = tmp_path_factory.mktemp("seed") / "corpus.jsonl"
    with open(DL19) as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            if i >= 2000:
                break
            dst.write(line)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reproducible_from_the_seed(tmp_path: Path, seed_corpus: Path) -> None:
    first = write_collection(tmp_path / "a", 500, 40, seed=3, seed_corpus=[seed_corpus], test_queries=20)
    write_collection(tmp_path / "b", 500, 40, seed=3, seed_corpus=[seed_corpus], test_queries=20)
    write_collection(tmp_path / "c", 500, 40, seed=4, seed_corpus=[seed_corpus], test_queries=20)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a["corpus.jsonl"] != c["corpus.jsonl"] and a["queries.jsonl"] != c["queries.jsonl"]
    assert first["passages"] == 500 and first["train_queries"] == 40 and first["test_queries"] == 20
    # no temporary folder is left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_a_valid_beir_collection_with_known_sources(tmp_path: Path, seed_corpus: Path) -> None:
    write_collection(tmp_path / "c", 800, 60, seed=0, seed_corpus=[seed_corpus], test_queries=30)
    loaded = load_beir_folder(tmp_path / "c", "c", on_unknown_qrels="fail")  # the prepare stage's reader
    assert len(loaded.corpus) == 800 and len(loaded.queries) == 90
    assert loaded.queries.split.value_counts().to_dict() == {"train": 60, "test": 30}
    assert len(loaded.qrels) == 90 and loaded.qrels.doc_id.nunique() == 90 and set(loaded.qrels.relevance) == {1}
    # the text is the seed corpus's: every word is in its vocabulary, lengths are within its range
    vocabulary = set()
    lengths = []
    for line in seed_corpus.read_text().splitlines():
        record = json.loads(line)
        words = f"{record['title']} {record['text']}".split()
        vocabulary.update(words)
        lengths.append(len(words))
    generated = loaded.corpus.text.str.split()
    assert set(generated.explode()) <= vocabulary
    assert min(lengths) <= generated.str.len().min() and generated.str.len().max() <= max(lengths)
    # the mean length is the seed's (sampled from its histogram)
    assert abs(generated.str.len().mean() / (sum(lengths) / len(lengths)) - 1) < 0.15
    # most of each query's words are in its source passage
    text = loaded.corpus.set_index("doc_id").text
    qrels = loaded.qrels.set_index("query_id").doc_id
    shares = [
        len(set(q.split()) & set(text[qrels[qid]].split())) / len(set(q.split()))
        for qid, q in zip(loaded.queries.query_id, loaded.queries.text, strict=True)
    ]
    assert sum(shares) / len(shares) > 0.6


def test_bm25_finds_the_source_passage(tmp_path: Path, seed_corpus: Path) -> None:
    """The project's own BM25 path (pyserini through pipeline.lucene) retrieves most queries' source passage."""
    write_collection(tmp_path / "c", 3000, 100, seed=0, seed_corpus=[seed_corpus], test_queries=100)
    loaded = load_beir_folder(tmp_path / "c", "c")
    index = build_index(loaded.corpus, tmp_path / "index", IndexConfig(threads=2))
    run = bm25_search(index, loaded.queries[["query_id", "text"]], 10, Bm25Config(), threads=2)
    hits = run.merge(loaded.qrels[["query_id", "doc_id"]], on=["query_id", "doc_id"])
    recall_at_1 = (hits["rank"] == 1).sum() / len(loaded.queries)
    recall_at_10 = hits.query_id.nunique() / len(loaded.queries)
    assert recall_at_10 >= 0.8, recall_at_10
    assert recall_at_1 >= 0.5, recall_at_1


def test_streaming_memory_does_not_grow_with_the_corpus(
    tmp_path: Path, seed_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(
        scale_collection.iter_passages(scale_collection.fit_seed_model(["a b"]), 0, 5, 0.5), types.GeneratorType
    )
    # blocks of 512 passages: both sizes hold many full blocks, so only what grows with N could differ
    monkeypatch.setattr(scale_collection, "BLOCK", 512)
    peaks = {}
    for passages in (3_000, 30_000):
        tracemalloc.start()
        write_collection(tmp_path / f"n{passages}", passages, 50, seed=0, seed_corpus=[seed_corpus], test_queries=50)
        peaks[passages] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 10x the passages (the corpus file: ~1 MB vs ~10 MB) and the peak stays what fitting the seed costs
    corpus_mb = (tmp_path / "n30000" / "corpus.jsonl").stat().st_size / 2**20
    assert corpus_mb > 8
    assert peaks[30_000] < 1.1 * peaks[3_000], peaks


def test_subset_keeps_the_test_split_and_a_train_prefix(tmp_path: Path, seed_corpus: Path) -> None:
    write_collection(tmp_path / "full", 600, 100, seed=0, seed_corpus=[seed_corpus], test_queries=20)
    subset = scale_collection.subset_queries(tmp_path / "full", tmp_path / "sub", 30)
    assert subset["train_queries"] == 30 and (tmp_path / "sub" / "corpus.jsonl").is_symlink()
    full = load_beir_folder(tmp_path / "full", "full")
    sub = load_beir_folder(tmp_path / "sub", "sub", on_unknown_qrels="fail")
    expected = pd.concat([full.queries[full.queries.split == "test"], full.queries[full.queries.split == "train"][:30]])
    assert sub.queries.query_id.tolist() == expected.query_id.tolist()
    assert sub.queries.text.tolist() == expected.text.tolist()
    assert len(sub.qrels) == 50
    with pytest.raises(ScaleCollectionError, match="train_queries 101"):
        scale_collection.subset_queries(tmp_path / "full", tmp_path / "sub2", 101)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--passages", "0", "--queries", "0"], "--passages 0: must be at least 1"),
        (["--passages", "10", "--queries", "10", "--test-queries", "1"], "more queries than --passages 10"),
        (["--passages", "10", "--queries", "-1"], "must not be negative"),
        (["--passages", "10", "--queries", "1", "--test-queries", "0", "--alpha", "1.5"], "--alpha 1.5"),
        (
            ["--passages", "10", "--queries", "1", "--test-queries", "0", "--seed-corpus", "/nonexistent.jsonl"],
            "--seed-corpus /nonexistent.jsonl: file not found",
        ),
    ],
)
def test_bad_arguments_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert scale_collection.main([*argv, "--out", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_malformed_seed_corpus_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed = tmp_path / "corpus.jsonl"
    seed.write_text('{"_id": "a", "text": "fine words here"}\n{"_id": "b", "text": \n')
    argv = ["--passages", "10", "--queries", "2", "--test-queries", "1", "--out", str(tmp_path / "c")]
    assert scale_collection.main([*argv, "--seed-corpus", str(seed)]) == 2
    assert f"--seed-corpus {seed}:2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_an_existing_output_is_refused(tmp_path: Path, seed_corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c").mkdir()
    argv = ["--passages", "10", "--queries", "2", "--test-queries", "1", "--out", str(tmp_path / "c")]
    assert scale_collection.main([*argv, "--seed-corpus", str(seed_corpus)]) == 2
    assert f"--out {tmp_path / 'c'}: already exists" in capsys.readouterr().err


def test_the_bench_measures_a_child_process(tmp_path: Path) -> None:
    """run_measured reports the child's own peak RSS (it allocates ~200 MiB) and its printed summary."""
    # it holds the memory for a second: the samplers look every 0.2 s
    code = "import json, time; b = bytearray(200 * 2**20); time.sleep(1); print(json.dumps({'n': 1}))"
    measured = scale.run_measured([sys.executable, "-c", code], tmp_path, tmp_path / "child.log")
    assert measured.returncode == 0 and measured.summary == {"n": 1}
    # VmHWM is the child's own; ru_maxrss also counts this (pytest) process's RSS when it spawned the child
    assert 200 <= measured.hwm_mb < 400, measured
    assert measured.max_rss_mb >= 200 and measured.tree_peak_mb >= 150, measured
    assert measured.wall_s > 0


@pytest.mark.slow
def test_the_bench_runs_end_to_end(tmp_path: Path) -> None:
    """bench/scale.py on a tiny generated collection: every stage runs, the report has their rows and slopes."""
    report = tmp_path / "scale.md"
    work = tmp_path / "work"
    argv = ["--work", str(work), "--methods", "bm25", "--passages", "1500", "--queries", "100", "300"]
    assert scale.main([*argv, "--results", str(report)]) == 0
    records = scale.load_records(work / "results-bm25.jsonl")
    assert [r["stage"] for r in records] == [
        *("prepare", "index", "retrieve", "teach", "build", "evaluate"),
        *("prepare", "retrieve", "teach", "build", "evaluate"),  # the index is the corpus size's, made once
    ]
    assert all(r["returncode"] == 0 and r["max_rss_mb"] > 50 for r in records)
    teach = [r for r in records if r["stage"] == "teach"]
    # what the server answered is what the stage says it paid (the cache starts empty: nothing is cached), and it
    # is up to 2 listwise windows (20/10 over 30 candidates) per train query: fewer where BM25 finds < 30 passages
    assert [r["teacher"]["calls_served"] for r in teach] == [r["summary"]["calls"]["paid"] for r in teach]
    assert [r["summary"]["calls"]["cached"] for r in teach] == [0, 0]
    assert 180 <= teach[0]["teacher"]["calls_served"] <= 200 and 540 <= teach[1]["teacher"]["calls_served"] <= 600
    text = report.read_text()
    assert "| 1,500 | 300 | teach |" in text and "| 1,500 | retrieve | 100, 300 |" in text and "Projection" in text
    # a second run measures nothing again: every stage is recorded
    assert scale.main([*argv, "--results", str(report)]) == 0
    assert len(scale.load_records(work / "results-bm25.jsonl")) == len(records)


@pytest.mark.parametrize("module", [scale_collection, scale])
def test_the_bench_modules_doctests(module: types.ModuleType) -> None:
    """Their docstring examples hold (here rather than in test_doctests.MODULES: bench/ is not an installed package,
    it imports only with the repository root on sys.path, which this file puts there)."""
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0, result
