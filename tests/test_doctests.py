"""The examples in the pipeline modules' docstrings run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "pipeline.config",
    "pipeline.sources",
    "pipeline.metrics",
    "pipeline.lucene",
    "pipeline.io",
    "pipeline.teacher.cache",
    "pipeline.teacher.client",
    "pipeline.teacher.imported",
    "pipeline.teacher.outcome",
    "pipeline.teacher.windows",
    "pipeline.teacher.fanout",
    "pipeline.teacher.candidates",
    "pipeline.teacher.quality",
    "pipeline.teacher.replay",
    "pipeline.teacher.chat_server",
    "pipeline.duck",
    "pipeline.teacher.rationales",
    "pipeline.synthesis",
    "pipeline.retrievers",
    "pipeline.pool",
    "pipeline.students.losses",
    "pipeline.students.backbones",
    "pipeline.students.groups",
    "pipeline.students.checkpoints",
    "pipeline.students.fidelity",
    "pipeline.students.outputs",
    "pipeline.students.cross_encoder",
    "pipeline.students.bi_encoder",
    "pipeline.report",
    "pipeline.headline",
    "pipeline.students.registry",
    "pipeline.students.r2r.reasons",
    "pipeline.students.r2r.model",
    "pipeline.students.r2r.faithfulness",
    "pipeline.students.explain",
    "pipeline.stages.evaluate",
    "pipeline.stages.build",
    "pipeline.stages.rerank",
    "pipeline.stages.synthesize",
    "flows.train_job",
)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"


def test_the_doctests_exist() -> None:
    """The modules that document behaviour by example still do (a lost docstring would pass silently)."""
    attempted = {name: doctest.testmod(importlib.import_module(name)).attempted for name in MODULES}
    for name in MODULES[:4] + MODULES[5:]:
        assert attempted[name] > 0, name
