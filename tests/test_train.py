"""build (teacher rankings → training examples, one group per query and list) and train (every kind end to end on
tiny random models, and the resume policy: a killed run resumes, a finished or changed one trains from scratch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_students import PASSAGES, QUERIES, tiny_cross_encoder, tiny_t5
from transformers import TrainerCallback

from conftest import run_cli, tiny_params, write_params
from pipeline import schemas
from pipeline.config import BuildConfig, Paths, StudentConfig, TeachTarget
from pipeline.io import read_table, write_table
from pipeline.stages import build, train
from pipeline.students import checkpoints
from pipeline.students.fidelity import fidelity
from pipeline.students.registry import load_student


def make_paths(root: Path) -> Paths:
    return Paths(
        collections=str(root / "collections"),
        teacher=str(root / "teacher"),
        synthetic=str(root / "synthetic"),
        training=str(root / "training"),
        students=str(root / "students"),
        checkpoints=str(root / "checkpoints"),
        metrics=str(root / "metrics"),
        plots=str(root / "plots"),
    )


def write_labelled_collection(
    paths: Paths, name: str = "t", queries: int = 6, per_query: int = 4, lists: tuple[str, ...] = ("bm25",)
) -> None:
    """A hand-made corpus, queries and teacher rankings (teacher rank = reverse document order), one ranked list
    per first stage in ``lists`` (the second list's order is rotated by one)."""
    docs = [f"d{i}" for i in range(per_query + 1)]
    corpus = pd.DataFrame(
        {
            "collection": name,
            "doc_id": docs,
            "title": [f"Title {i}" for i in range(len(docs))],
            "text": [PASSAGES[i % len(PASSAGES)] for i in range(len(docs))],
        }
    )
    query_ids = [f"q{i}" for i in range(queries)]
    query_table = pd.DataFrame(
        {
            "collection": name,
            "query_id": query_ids,
            "text": [QUERIES[i % len(QUERIES)] for i in range(queries)],
            "split": "train",
            "origin": "collection",
            "source_doc_id": None,
        }
    )
    frames = []
    for n, first_stage in enumerate(lists):
        rows = [
            (q, docs[per_query - (k + n) % per_query], k + 1, float(per_query - k), k + 1)  # d4 first, d3 second...
            for q in query_ids
            for k in range(per_query)
        ]
        frames.append(
            pd.DataFrame(rows, columns=["query_id", "doc_id", "teacher_rank", "score", "first_stage_rank"]).assign(
                collection=name,
                model="teacher-llm",
                method="pointwise",
                first_stage=first_stage,
                template_hash="abc",
                run_id="r1",
            )
        )
    rankings = pd.concat(frames, ignore_index=True)
    write_table(corpus, schemas.CORPUS, paths.collection_dir(name) / "corpus.parquet")
    write_table(query_table, schemas.QUERIES, paths.collection_dir(name) / "queries.parquet")
    write_table(rankings, schemas.TEACHER_RANKINGS, paths.teacher_dir(name) / "teacher_rankings.parquet")


# -- build --------------------------------------------------------------------------------------------------------
def test_build_targets_groups_and_dev_split(tmp_path: Path) -> None:
    paths = make_paths(tmp_path)
    write_labelled_collection(paths, queries=10, per_query=4)
    summary = build.run("t", TeachTarget(), BuildConfig(dev_fraction=0.2, seed=1), paths)
    examples = read_table(paths.training_dir("t") / "examples.parquet")
    assert summary["queries"] == {"dev": 2, "train": 8} and summary["pairs"] == {"dev": 8, "train": 32}
    assert summary["groups"] == {"dev": 2, "train": 8} and summary["lists"] == ["teacher-llm@bm25"]
    assert summary["teacher"] == ["teacher-llm/pointwise"]
    first = examples[examples.query_id == "q0"].sort_values("teacher_rank")
    assert first.target.tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert first.doc_id.tolist() == ["d4", "d3", "d2", "d1"]
    assert first.passage.iloc[0].startswith("Title 4") and PASSAGES[0] in first.passage.iloc[0]
    assert first["query"].iloc[0] == QUERIES[0] and first.teacher_score.tolist() == [4.0, 3.0, 2.0, 1.0]
    assert examples.groupby("query_id").split.nunique().max() == 1  # a query's candidates share its split
    # seeded: the same dev queries again; another seed may pick others
    build.run("t", TeachTarget(), BuildConfig(dev_fraction=0.2, seed=1), paths)
    again = read_table(paths.training_dir("t") / "examples.parquet")
    assert set(again[again.split == "dev"].query_id) == set(examples[examples.split == "dev"].query_id)


def test_build_makes_one_group_per_list_and_holds_out_queries_in_every_list(tmp_path: Path) -> None:
    paths = make_paths(tmp_path)
    write_labelled_collection(paths, queries=8, per_query=4, lists=("bm25", "tas-b"))
    summary = build.run("t", TeachTarget(), BuildConfig(dev_fraction=0.25, seed=0), paths)
    examples = read_table(paths.training_dir("t") / "examples.parquet")
    assert summary["lists"] == ["teacher-llm@bm25", "teacher-llm@tas-b"]
    assert summary["groups"] == {"dev": 4, "train": 12} and summary["queries"] == {"dev": 2, "train": 6}
    # a passage both lists rank is an example in each, with each list's own rank (never merged)
    q0 = examples[(examples.query_id == "q0") & (examples.doc_id == "d4")]
    assert sorted(q0.list) == ["teacher-llm@bm25", "teacher-llm@tas-b"] and sorted(q0.teacher_rank) == [1, 4]
    # the split is at the query level: a dev query is dev in every list
    assert examples.groupby("query_id").split.nunique().max() == 1
    dev = set(examples[examples.split == "dev"].query_id)
    assert all(set(examples[examples.list == lst].query_id) & dev == dev for lst in summary["lists"])


def test_build_keeps_the_synthetic_dev_split(tmp_path: Path) -> None:
    paths = make_paths(tmp_path)
    write_labelled_collection(paths, queries=3)
    queries = read_table(paths.collection_dir("t") / "queries.parquet").assign(
        split=["train", "dev", "train"], origin="cropped"
    )
    write_table(queries, schemas.QUERIES, paths.synthetic_dir("t") / "queries.parquet")
    build.run("t", TeachTarget(queries="synthetic"), BuildConfig(dev_fraction=0.5), paths)
    examples = read_table(paths.training_dir("t") / "examples.parquet")
    assert set(examples[examples.split == "dev"].query_id) == {"q1"}


def test_build_errors_name_the_missing_step(tmp_path: Path) -> None:
    paths = make_paths(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `distillrank stage teach t`"):
        build.run("t", TeachTarget(), BuildConfig(), paths)
    write_labelled_collection(paths)
    empty = read_table(paths.teacher_dir("t") / "teacher_rankings.parquet").iloc[0:0]
    write_table(empty, schemas.TEACHER_RANKINGS, paths.teacher_dir("t") / "teacher_rankings.parquet")
    with pytest.raises(build.NoTeacherLabels, match="ranked nothing"):
        build.run("t", TeachTarget(), BuildConfig(), paths)


def test_build_cli_reports_missing_labels(tmp_path: Path) -> None:
    params = tiny_params(tmp_path, teach={"collection": {"tiny": {"split": "train"}}})
    write_params(tmp_path / "params.yaml", params)
    result = run_cli(["distillrank", "stage", "build", "tiny", "--params", "params.yaml"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "run `distillrank stage teach tiny`" in result.stderr


# -- fidelity: one definition for every kind ----------------------------------------------------------------------
def test_fidelity_of_a_reversed_ranking() -> None:
    frame = pd.DataFrame(
        {"query_id": ["q"] * 4, "doc_id": list("abcd"), "teacher_rank": [1, 2, 3, 4], "score": [1.0, 2, 3, 4]}
    )
    values = fidelity(frame)
    assert values["kendall_tau"] == pytest.approx(-1.0)
    assert 0 < values["nDCG@10"] < 1


def test_fidelity_averages_over_lists_and_reports_each() -> None:
    """Two lists of one query: the student agrees with the first and reverses the second."""
    frame = pd.DataFrame(
        {
            "query_id": ["q"] * 6,
            "list": ["a"] * 3 + ["b"] * 3,
            "doc_id": list("xyz") * 2,
            "teacher_rank": [1, 2, 3, 3, 2, 1],
            "score": [3.0, 2.0, 1.0] * 2,
        }
    )
    values = fidelity(frame)
    assert values["groups"] == 2 and values["kendall_tau"] == pytest.approx(0.0)
    assert values["per_list"]["a"] == {"nDCG@10": 1.0, "nDCG@5": 1.0, "kendall_tau": 1.0}
    assert values["per_list"]["b"]["kendall_tau"] == pytest.approx(-1.0) and values["per_list"]["b"]["nDCG@10"] < 1


# -- train --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_cross_encoder(tmp_path_factory.mktemp("backbone")))


def student_config(backbone: str, **overrides: object) -> StudentConfig:
    values: dict = dict(
        kind="cross-encoder",
        backbone=backbone,
        labels="t",
        max_length=32,
        group_size=3,
        queries_per_batch=2,
        gradient_accumulation=1,
        max_steps=6,
        eval_every=2,
        learning_rate=1e-3,
    )
    values.update(overrides)
    return StudentConfig(**values)


def built(tmp_path: Path, lists: tuple[str, ...] = ("bm25",)) -> Paths:
    paths = make_paths(tmp_path)
    write_labelled_collection(paths, queries=8, lists=lists)
    build.run("t", TeachTarget(), BuildConfig(dev_fraction=0.25), paths)
    return paths


def check_common_outputs(paths: Paths, name: str, summary: dict, steps: int) -> None:
    """What every kind leaves: metrics, curve, card with provenance, distillrank_student.json, no temp folder."""
    assert summary["steps"] == steps and summary["resumed_from_step"] == 0 and np.isfinite(summary["train_loss"])
    assert {"nDCG@10", "kendall_tau", "groups"} <= set(summary["dev"]) and 0 <= summary["dev"]["nDCG@10"] <= 1
    assert summary["precision"] in {"fp32", "bf16"} and summary["pairs_per_second"] > 0
    folder = paths.student_dir(name)
    card = (folder / "README.md").read_text()
    assert "Distillation (distillrank)" in card and "teacher-llm" in card and "teacher-llm@bm25" in card
    info = json.loads((folder / "distillrank_student.json").read_text())
    assert info["teacher"]["model"] == "teacher-llm" and info["teacher"]["lists"] == ["teacher-llm@bm25"]
    assert not list(folder.parent.glob(f".{name}.tmp-*"))  # the temporary folder was renamed
    curve = pd.read_csv(Path(paths.plots) / "training" / f"{name}.csv")
    assert list(curve.columns[:4]) == ["step", "train_loss", "dev_ndcg@10", "dev_kendall_tau"]
    assert curve["dev_ndcg@10"].notna().any()
    assert (Path(paths.plots) / "training" / f"{name}.png").stat().st_size > 1000
    metrics = json.loads((Path(paths.metrics) / "students" / f"{name}.json").read_text())
    assert {"kind", "backbone", "loss", "steps", "best_step", "dev", "train_pairs", "seconds"} <= set(metrics)
    assert (paths.checkpoint_dir(name) / checkpoints.FINISHED_FILE).is_file()


def test_train_a_cross_encoder_on_the_library_trainer(tmp_path: Path, backbone: str) -> None:
    from sentence_transformers.cross_encoder import CrossEncoder

    paths = built(tmp_path)
    summary = train.run("s", student_config(backbone), paths)
    check_common_outputs(paths, "s", summary, steps=6)
    assert summary["best_step"] in {2, 4, 6} and summary["train_pairs"] == 24 and summary["max_length"] == 32
    folder = paths.student_dir("s")
    card = (folder / "README.md").read_text()
    assert "sentence-transformers" in card and "RankNetLoss" in card  # the library's own card, extended
    student = load_student(folder, device="cpu")
    scores = student.score(QUERIES[0], PASSAGES)
    # a native CrossEncoder save: the library loads it and gives the student's raw scores
    native = CrossEncoder(str(folder), device="cpu").predict([(QUERIES[0], p) for p in PASSAGES])
    assert np.isfinite(scores).all() and np.allclose(native, scores, atol=0.05)


@pytest.mark.parametrize("loss", ["listnet", "lambdaloss", "margin-mse", "bce"])
def test_every_cross_encoder_loss_trains(tmp_path: Path, backbone: str, loss: str) -> None:
    paths = built(tmp_path)
    summary = train.run("s", student_config(backbone, loss=loss, max_steps=2), paths)
    assert summary["steps"] == 2 and np.isfinite(summary["train_loss"]) and summary["loss"] == loss


@pytest.mark.parametrize("loss", ["kl", "margin-mse", "mnrl"])
def test_train_a_bi_encoder(tmp_path: Path, backbone: str, loss: str) -> None:
    from sentence_transformers import SentenceTransformer

    paths = built(tmp_path)
    cfg = student_config(backbone, kind="bi-encoder", loss=loss, max_steps=4, eval_every=2)
    summary = train.run("b", cfg, paths)
    check_common_outputs(paths, "b", summary, steps=4)
    folder = paths.student_dir("b")
    student = load_student(folder, device="cpu")
    assert student.kind == "bi-encoder"
    scores = student.score(QUERIES[0], PASSAGES)
    native = SentenceTransformer(str(folder), device="cpu")
    cosine = native.similarity(native.encode([QUERIES[0]]), native.encode(PASSAGES)).numpy().ravel()
    assert np.allclose(cosine, scores, atol=0.05)


def test_train_a_seq2seq_student(tmp_path: Path) -> None:
    paths = built(tmp_path)
    t5 = str(tiny_t5(tmp_path / "t5"))
    summary = train.run("t5", student_config(t5, kind="twolar-seq2seq", max_steps=2, loss="lambdaloss"), paths)
    check_common_outputs(paths, "t5", summary, steps=2)
    assert load_student(paths.student_dir("t5"), device="cpu").kind == "twolar-seq2seq"


def test_train_needs_built_examples(tmp_path: Path, backbone: str) -> None:
    with pytest.raises(FileNotFoundError, match="distillrank stage build t"):
        train.run("s", student_config(backbone), make_paths(tmp_path))


# -- resume policy ------------------------------------------------------------------------------------------------
class KillAfterSave(TrainerCallback):
    """Stands in for a SIGKILL: the run dies right after the checkpoint of ``step`` is on disk."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt(f"killed after step {state.global_step}")


@pytest.mark.parametrize("kind", ["cross-encoder", "twolar-seq2seq"])
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path, backbone: str, kind: str) -> None:
    paths = built(tmp_path)
    model = backbone if kind == "cross-encoder" else str(tiny_t5(tmp_path / "t5"))
    cfg = student_config(model, kind=kind, max_steps=8, loss="listnet")
    with pytest.raises(KeyboardInterrupt):
        train.run("s", cfg, paths, callbacks=[KillAfterSave(4)])
    assert not paths.student_dir("s").exists()  # nothing half-written
    assert (paths.checkpoint_dir("s") / "checkpoint-4").is_dir()
    assert not (paths.checkpoint_dir("s") / checkpoints.FINISHED_FILE).exists()
    summary = train.run("s", cfg, paths)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    state = json.loads((paths.checkpoint_dir("s") / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    curve = pd.read_csv(Path(paths.plots) / "training" / "s.csv")
    assert curve["dev_ndcg@10"].notna().sum() >= 4  # steps 2 and 4 from the first run, 6 and 8 from the second


def test_a_finished_run_trains_again_from_scratch(tmp_path: Path, backbone: str) -> None:
    """A finished run is never resumed (it would train 0 steps and report figures the current code did not make),
    whatever changed; a changed config also clears its checkpoints."""
    paths = built(tmp_path)
    cfg = student_config(backbone, max_steps=4)
    first = train.run("s", cfg, paths)
    again = train.run("s", cfg, paths)
    assert again["resumed_from_step"] == 0 and again["steps"] == 4
    assert again["dev"] == first["dev"]  # seeded: the same run again
    changed = train.run("s", student_config(backbone, max_steps=2, learning_rate=5e-4), paths)
    assert changed["resumed_from_step"] == 0 and changed["steps"] == 2
    recorded = json.loads((paths.checkpoint_dir("s") / checkpoints.FINGERPRINT_FILE).read_text())
    assert recorded["student"]["learning_rate"] == 5e-4


def test_a_killed_run_whose_code_changed_trains_from_scratch(
    tmp_path: Path, backbone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = built(tmp_path)
    cfg = student_config(backbone, max_steps=6)
    with pytest.raises(KeyboardInterrupt):
        train.run("s", cfg, paths, callbacks=[KillAfterSave(2)])
    assert (paths.checkpoint_dir("s") / "checkpoint-2").is_dir()
    monkeypatch.setattr(checkpoints, "code_sha256", lambda package=None: "edited pipeline/students")
    summary = train.run("s", cfg, paths)
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 6
    recorded = json.loads((paths.checkpoint_dir("s") / checkpoints.FINGERPRINT_FILE).read_text())
    assert recorded["code_sha256"] == "edited pipeline/students"


def test_the_fingerprint_covers_the_students_code() -> None:
    digest = checkpoints.code_sha256()
    assert len(digest) == 64 and digest == checkpoints.code_sha256()
    assert (checkpoints.STUDENTS_PACKAGE / "trainer.py").is_file()
