"""Students bench: k-fold distillation of TREC-DL 2019's recorded LLM teachers, measured on held-out queries. Run
on demand; it prints figures (not a test) and writes them as JSON.

    .venv/bin/python bench/students.py [--student minilm-bi] [--teachers all|rankgpt-gpt-3.5-turbo.bm25,...]
                                       [--folds 5] [--seed 0] [--precision auto|fp32|bf16] [--scifact]
                                       [--set KEY=VALUE ...] [--out bench/results/students-<tag>.json]

The 43 queries are split into ``--folds`` seeded folds; for each fold a student (``students.<name>`` of
params.yaml, changed by ``--set``) is trained by the pipeline's own code (``build.build_examples`` with the fold's
queries as dev, then the kind's ``train``) on the other folds' queries, in every ranked list of the chosen
teachers, and reranks the fold's queries' shipped BM25 top 100 (``pipeline.rerank.rerank_run``). So every query
is measured once, by a student that never saw it. Reported, over the 43 queries (``ir_measures``, TREC-DL's
graded qrels): nDCG@10 of BM25, of the student's untrained starting point, of the trained student and of each
teacher's list (the BM25-based lists rerank the same candidates); paired t-tests of the student against BM25 and
against its start; fidelity to the teachers on the held-out queries (Kendall's tau, nDCG@10 with the teacher's
ranking as labels); training pairs/s. ``--scifact``: a student trained on all 43 queries reranks SciFact test's
BM25 top 100 (the out-of-domain figure; needs the pipeline's SciFact retrieval, ``make run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import BuildConfig, ImportedConfig, ImportedFile, load_params  # noqa: E402
from pipeline.io import read_table  # noqa: E402
from pipeline.lucene import document_contents  # noqa: E402
from pipeline.metrics import evaluate_run  # noqa: E402
from pipeline.rerank import rerank_run  # noqa: E402
from pipeline.sources import load_beir_folder  # noqa: E402
from pipeline.stages.build import build_examples  # noqa: E402
from pipeline.students.fidelity import student_fidelity  # noqa: E402
from pipeline.students.groups import query_groups  # noqa: E402
from pipeline.students.registry import kind_module  # noqa: E402
from pipeline.teacher.imported import import_files, list_name  # noqa: E402

DL19 = REPO.parent / "shared" / "data" / "trec-dl-2019"
MEASURE = "nDCG@10"
MIN_RELEVANCE = 2  # TREC-DL: binary measures count grade 2 and above (nDCG uses the grades)


def teacher_files(names: str) -> list[ImportedFile]:
    """The recorded teachers of TREC-DL 2019 (``teachers/<teacher>.<first stage>.trec``), all or by name."""
    paths = sorted((DL19 / "teachers").glob("*.trec"))
    chosen = paths if names == "all" else [DL19 / "teachers" / f"{n}.trec" for n in names.split(",")]
    missing = [str(p) for p in chosen if not p.is_file()]
    if missing:
        raise SystemExit(f"error: no recorded teacher {missing} (known: {[p.stem for p in paths]})")
    files = []
    for path in chosen:
        teacher, first_stage = path.stem.rsplit(".", 1)
        files.append(ImportedFile(path=str(path), teacher=teacher, first_stage=first_stage))
    return files


def apply_settings(cfg, settings: list[str]):
    """``--set learning_rate=2e-5 --set bi_encoder.teacher_temperature=0.1`` on a StudentConfig."""
    for setting in settings:
        key, _, raw = setting.partition("=")
        value = yaml.safe_load(raw)
        if "." in key:
            outer, inner = key.split(".", 1)
            cfg = dataclasses.replace(cfg, **{outer: dataclasses.replace(getattr(cfg, outer), **{inner: value})})
        else:
            cfg = dataclasses.replace(cfg, **{key: value})
    return cfg


def folds_of(query_ids: list[str], count: int, seed: int) -> list[list[str]]:
    order = np.random.default_rng(seed).permutation(sorted(query_ids))
    return [sorted(order[i::count].tolist()) for i in range(count)]


def per_query(qrels: pd.DataFrame, run: pd.DataFrame) -> pd.Series:
    frame = evaluate_run(qrels, run, (MEASURE,), MIN_RELEVANCE).per_query
    return frame.set_index("query_id").value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--student", default="minilm-bi", help="a student of params.yaml (its kind, loss, ...)")
    parser.add_argument("--teachers", default="all")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default=None, help="override the student's precision (auto|fp32|bf16)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only-folds", default=None, help="e.g. 0,1: a quick look (not the whole figure)")
    parser.add_argument("--scifact", action="store_true")
    parser.add_argument(
        "--check-precision",
        action="store_true",
        help="only score with the untrained student in fp32 and in bf16 (all 43 queries, BM25 top 100): nDCG@10 "
        "and pairs/s of each, then exit",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if args.student not in params.students:
        raise SystemExit(f"error: no student {args.student!r} in {args.params} (students: {sorted(params.students)})")
    cfg = params.students[args.student]
    if args.precision:
        cfg = dataclasses.replace(cfg, precision=args.precision)
    cfg = apply_settings(cfg, args.settings)
    module = kind_module(cfg.kind)

    collection = load_beir_folder(DL19, "trec-dl-2019")
    qrels = collection.qrels[collection.qrels.split == "test"]
    queries = collection.queries
    texts = dict(zip(queries.query_id, queries.text, strict=True))
    corpus = collection.corpus
    passages = {d: document_contents(t, x) for d, t, x in zip(corpus.doc_id, corpus.title, corpus.text, strict=True)}
    bm25 = collection.shipped_runs[collection.shipped_runs.run == "bm25"][["query_id", "doc_id", "rank", "score"]]
    if args.check_precision:
        report = precision_check(cfg, module, texts, passages, bm25, qrels)
        print(json.dumps(report, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return 0
    files = teacher_files(args.teachers)
    labels = import_files(ImportedConfig(files=tuple(files))).rankings
    labels = labels.assign(collection="trec-dl-2019", method="imported", first_stage_rank=None, run_id="bench")
    query_ids = sorted(set(qrels.query_id))
    folds = folds_of(query_ids, args.folds, args.seed)
    chosen = range(len(folds)) if args.only_folds is None else [int(i) for i in args.only_folds.split(",")]

    runs: dict[str, list[pd.DataFrame]] = {"student": [], "untrained": []}
    fidelity_rows, fold_summaries = [], []
    started = time.perf_counter()
    for number in chosen:
        dev = set(folds[number])
        examples, _ = build_examples(
            "trec-dl-2019", labels, queries, corpus, BuildConfig(), keep_dev_split=False, dev_queries=dev
        )
        with tempfile.TemporaryDirectory(prefix="bench-students-") as tmp:
            result = module.train(
                f"fold{number}", cfg, examples, None, Path(tmp) / "student", Path(tmp) / "checkpoints"
            )
            student = module.load(Path(tmp) / "student", result.info, None)
        untrained = module.untrained(cfg, max_length=result.info.get("max_length"))
        fold_run = bm25[bm25.query_id.isin(dev)]
        runs["student"].append(rerank_run(student, texts, passages, fold_run, depth=100))
        runs["untrained"].append(rerank_run(untrained, texts, passages, fold_run, depth=100))
        dev_groups = query_groups(examples, "dev")
        fidelity_rows.append(
            {"fold": number, "trained": result.summary["dev"], "untrained": student_fidelity(untrained, dev_groups)}
        )
        summary = {k: result.summary.get(k) for k in ("steps", "train_loss", "pairs_per_second", "seconds")}
        fold_summaries.append(
            {"fold": number, "queries": len(dev), **summary, "precision": result.summary["precision"]}
        )
        print(f"fold {number}: {json.dumps(fold_summaries[-1])}", flush=True)

    measured = sorted(set().union(*[set(f) for i, f in enumerate(folds) if i in set(chosen)]))
    judged = qrels[qrels.query_id.isin(measured)]
    figures = {
        "bm25": per_query(judged, bm25[bm25.query_id.isin(measured)]),
        "untrained": per_query(judged, pd.concat(runs["untrained"])),
        "student": per_query(judged, pd.concat(runs["student"])),
    }
    for (teacher, first_stage), frame in labels.groupby(["model", "first_stage"]):
        run = frame[frame.query_id.isin(measured)].assign(score=lambda f: -f.teacher_rank.astype(float))
        figures[f"teacher:{list_name(teacher, first_stage)}"] = per_query(judged, run)

    def paired(a: str, b: str) -> dict:
        x, y = figures[a].loc[measured], figures[b].loc[measured]
        delta = x - y
        return {
            "delta": round(float(delta.mean()), 4),
            "wins": int((delta > 0).sum()),
            "losses": int((delta < 0).sum()),
            "p_value": float(f"{stats.ttest_rel(x, y).pvalue:.3g}") if delta.any() else 1.0,
        }

    def mean_fidelity(key: str, measure: str) -> float:
        return round(float(np.mean([row[key][measure] for row in fidelity_rows])), 4)

    report = {
        "student": args.student,
        "config": dataclasses.asdict(cfg),
        "teachers": [list_name(f.teacher, f.first_stage) for f in files],
        "folds": args.folds,
        "seed": args.seed,
        "queries": len(measured),
        MEASURE: {name: round(float(values.loc[measured].mean()), 4) for name, values in figures.items()},
        "student_vs_bm25": paired("student", "bm25"),
        "student_vs_untrained": paired("student", "untrained"),
        "untrained_vs_bm25": paired("untrained", "bm25"),
        "fidelity_on_held_out": {
            "trained": {m: mean_fidelity("trained", m) for m in ("nDCG@10", "kendall_tau")},
            "untrained": {m: mean_fidelity("untrained", m) for m in ("nDCG@10", "kendall_tau")},
        },
        "training": fold_summaries,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.scifact:
        report["scifact_test"] = scifact_figure(params, cfg, module, labels, queries, corpus)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


def precision_check(cfg, module, texts, passages, bm25, qrels) -> dict:
    """The untrained student's nDCG@10 and scoring speed in fp32 and in bf16, on the same pairs."""
    from pipeline.students.backbones import bf16_supported, pick_device

    out: dict = {"bf16_units": bf16_supported(pick_device(None)), "pairs": len(bm25)}
    for precision in ("fp32", "bf16"):
        scorer = module.untrained(dataclasses.replace(cfg, precision=precision), max_length=None)
        started = time.perf_counter()
        run = rerank_run(scorer, texts, passages, bm25, depth=100)
        seconds = time.perf_counter() - started
        out[precision] = {
            "precision_used": scorer.precision,
            MEASURE: round(float(per_query(qrels, run).mean()), 4),
            "pairs_per_second": round(len(bm25) / seconds, 1),
        }
    out["delta_bf16_minus_fp32"] = round(out["bf16"][MEASURE] - out["fp32"][MEASURE], 4)
    return out


def scifact_figure(params, cfg, module, labels, queries, corpus) -> dict:
    """A student trained on all 43 queries reranks SciFact test's BM25 top 100 (our pyserini run)."""
    paths = params.paths
    candidates_path = paths.retrieval_dir("scifact") / "candidates.parquet"
    if not candidates_path.is_file():
        raise SystemExit(f"error: {candidates_path} is missing: run `make run` (or dvc repro retrieve@scifact) first")
    examples, _ = build_examples(
        "trec-dl-2019", labels, queries, corpus, BuildConfig(), keep_dev_split=False, dev_queries=set()
    )
    with tempfile.TemporaryDirectory(prefix="bench-students-") as tmp:
        result = module.train("all", cfg, examples, None, Path(tmp) / "student", Path(tmp) / "checkpoints")
        student = module.load(Path(tmp) / "student", result.info, None)
    untrained = module.untrained(cfg, max_length=result.info.get("max_length"))
    sci_queries = read_table(paths.collection_dir("scifact") / "queries.parquet")
    sci_queries = sci_queries[sci_queries.split.str.contains("test")]
    sci_qrels = read_table(paths.collection_dir("scifact") / "qrels.parquet")
    sci_qrels = sci_qrels[sci_qrels.split == "test"]
    sci_corpus = read_table(paths.collection_dir("scifact") / "corpus.parquet")
    candidates = read_table(candidates_path)
    bm25 = candidates[(candidates.method == "bm25") & candidates.query_id.isin(set(sci_queries.query_id))]
    texts = dict(zip(sci_queries.query_id, sci_queries.text, strict=True))
    docs = {
        d: document_contents(t, x)
        for d, t, x in zip(sci_corpus.doc_id, sci_corpus.title, sci_corpus.text, strict=True)
        if d in set(bm25.doc_id)
    }
    out = {"bm25": float(per_query(sci_qrels, bm25).mean())}
    for name, scorer in (("untrained", untrained), ("student", student)):
        out[name] = float(per_query(sci_qrels, rerank_run(scorer, texts, docs, bm25, depth=100)).mean())
    return {k: round(v, 4) for k, v in out.items()}


if __name__ == "__main__":
    sys.exit(main())
