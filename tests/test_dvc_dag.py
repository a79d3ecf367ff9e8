"""What each stage of the real dvc.yaml depends on, checked with DVC itself on the repository's params.yaml.

No stage runs here (except one that fails on purpose): every output is a placeholder file and ``dvc commit``
records the lock, so ``dvc status`` says exactly which stages a change of params.yaml makes stale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_repo_copy, run_cli, write_params

PLACEHOLDER = b"placeholder\n"
# the stages a change to the DL19 target's inputs may touch: its own collection's, and its own
COLLECTION_TARGET = "teach-collection@trec-dl-2019"
COLLECTION_CHAIN = {
    "prepare@trec-dl-2019",
    "index@trec-dl-2019",
    "encode@trec-dl-2019",
    "retrieve@trec-dl-2019",
    COLLECTION_TARGET,
}


@contextlib.contextmanager
def dvc_repo(repo: Path) -> Iterator:
    """DVC's API on ``repo`` (it resolves the stages' paths from the working directory)."""
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(str(repo)) as dvc:
        yield dvc


def repository_params() -> dict:
    """params.yaml as committed, with each collection's source a placeholder folder inside the copy (DVC hashes
    a source; nothing reads it here)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for name, collection in params["collections"].items():
        collection["source"] = f"sources/{name}"
    return params


def placeholder(path: Path) -> None:
    """A file for an output with a suffix (tables, JSON, plots), else a folder holding one file."""
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PLACEHOLDER)
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "placeholder").write_bytes(PLACEHOLDER)


@pytest.fixture
def committed(tmp_path: Path) -> Iterator[Path]:
    """A copy of the repository whose every stage is up to date in dvc.lock, outputs being placeholders."""
    params = repository_params()
    repo = make_repo_copy(tmp_path / "repo", params)
    for name in params["collections"]:
        placeholder(repo / "sources" / name)
    with dvc_repo(repo) as dvc:
        for stage in dvc.index.stages:
            for out in stage.outs:
                placeholder(Path(out.fs_path))
        dvc.commit(force=True)
        assert dvc.status() == {}
    yield repo


def stale(repo: Path, *targets: str) -> set[str]:
    """The stages among ``targets`` and their upstream ones that dvc status reports as changed."""
    with dvc_repo(repo) as dvc:
        return set(dvc.status(targets=list(targets), with_deps=True))


def edit_params(repo: Path, edit) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    edit(params)
    write_params(repo / "params.yaml", params)


def upstream(repo: Path, target: str) -> set[str]:
    with dvc_repo(repo) as dvc:
        return {stage.addressing for stage in dvc.stage.collect(target, with_deps=True)}


def test_a_target_on_a_collections_own_queries_depends_on_that_collection_only(committed: Path) -> None:
    assert upstream(committed, COLLECTION_TARGET) == COLLECTION_CHAIN
    assert upstream(committed, "build-collection@trec-dl-2019") == COLLECTION_CHAIN | {"build-collection@trec-dl-2019"}
    # the synthetic target does depend on its synthesized queries and their pool
    assert {"synthesize@scifact", "pool@scifact"} <= upstream(committed, "teach-synthetic@scifact")


def test_synthesize_params_leave_the_collection_target_up_to_date(committed: Path) -> None:
    edit_params(
        committed, lambda p: p["synthesize"]["scifact"].update(cropped=p["synthesize"]["scifact"]["cropped"] + 1)
    )
    assert stale(committed, COLLECTION_TARGET, "build-collection@trec-dl-2019", "train@minilm-bi") == set()
    # ... and the change is seen where it matters
    assert stale(committed, "teach-synthetic@scifact") == {"synthesize@scifact"}


def test_how_a_target_is_taught_never_re_synthesizes(committed: Path) -> None:
    # the teacher's method (what teach-synthetic@scifact uses) is not a parameter of the query generator
    edit_params(committed, lambda p: p["teacher"].update(method="listwise"))
    assert stale(committed, "synthesize@scifact") == set()
    assert stale(committed, "teach-synthetic@scifact") == {"teach-synthetic@scifact"}
    # a parameter of the DL19 target touches that target only
    edit_params(committed, lambda p: p["teacher"].update(method="pointwise"))
    edit_params(committed, lambda p: p["teach"]["collection"]["trec-dl-2019"].update(depth=50))
    assert stale(committed, "teach-synthetic@scifact") == set()
    assert stale(committed, COLLECTION_TARGET) == {COLLECTION_TARGET}
    # what the generator does read: the teacher's sampling
    edit_params(committed, lambda p: p["teacher"]["sampling"].update(seed=1))
    assert "synthesize@scifact" in stale(committed, "synthesize@scifact")


def test_a_failed_teach_run_leaves_the_previous_labels_in_place(committed: Path) -> None:
    """persist: DVC does not delete the teach stage's outputs before running it, so a failure keeps the last good
    ones; a stage without persist (build) loses them, and `dvc checkout` brings them back from the DVC cache."""
    edit_params(committed, lambda p: p["teach"]["collection"]["trec-dl-2019"].update(depth=50))
    failed = run_cli(["dvc", "repro", "--single-item", COLLECTION_TARGET], committed)
    assert failed.returncode != 0  # the placeholder tables are no Parquet
    teacher = committed / "data/teacher/trec-dl-2019"
    for table in ("teacher_rankings", "teacher_windows", "rationales"):
        assert (teacher / f"{table}.parquet").read_bytes() == PLACEHOLDER
    assert (committed / "metrics/teacher/trec-dl-2019.json").read_bytes() == PLACEHOLDER

    forced = run_cli(["dvc", "repro", "--force", "--single-item", "build-collection@trec-dl-2019"], committed)
    assert forced.returncode != 0
    training = committed / "data/training/trec-dl-2019"
    assert not training.exists()
    restored = run_cli(["dvc", "checkout", "build-collection@trec-dl-2019"], committed)
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert (training / "placeholder").read_bytes() == PLACEHOLDER


def test_outputs_that_are_costly_to_remake_persist(committed: Path) -> None:
    with dvc_repo(committed) as dvc:
        for stage in dvc.index.stages:
            if stage.addressing.split("@")[0] in {"teach-collection", "teach-synthetic", "synthesize", "train"}:
                assert all(out.persist for out in stage.outs), stage.addressing
