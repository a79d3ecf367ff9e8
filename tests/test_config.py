"""params.yaml parsing: defaults, and errors that name the key path and suggest the right key."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FIXTURE, REPO, tiny_params, write_params
from pipeline.config import (
    Bm25Config,
    ConfigError,
    Params,
    Paths,
    load_params,
    parse_params,
)


def minimal() -> dict:
    """The smallest valid params: every section with a default left out."""
    return {
        "collections": {"tiny": {"source": str(FIXTURE)}},
        "train": {"collection": "tiny"},
        "evaluation": {"tiny": {}},
    }


def config_error(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    return str(info.value)


def test_the_repository_params_parse() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.train.collection in params.collections
    assert set(params.evaluation) <= set(params.collections)
    assert params.collections["trec-dl-2019"].min_relevance == 2
    assert params.evaluate.measures[0] == "nDCG@10"


def test_tiny_params_parse_with_their_values(tmp_path: Path) -> None:
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params(tmp_path)))
    assert params.collections["tiny"].source == str(FIXTURE)
    assert params.retrieve.depth == 10
    assert params.retrieve.threads == 1
    assert params.retrieve.methods == ("bm25",)
    assert params.paths.collections == str(tmp_path / "data/collections")
    assert params.paths.collection_dir("tiny") == tmp_path / "data/collections" / "tiny"
    assert params.paths.index_dir("tiny") == tmp_path / "data/indexes" / "tiny"
    assert params.paths.retrieval_dir("tiny") == tmp_path / "data/retrieval" / "tiny"


def test_defaults_fill_every_omitted_section() -> None:
    params = parse_params(minimal())
    assert params.paths == Paths()
    assert params.paths.collections == "data/collections"
    assert params.collections["tiny"].min_relevance == 1
    assert params.train.split == "train"
    assert params.evaluation["tiny"].split == "test"
    assert params.ir_datasets == {}
    assert params.prepare.on_unknown_qrels == "warn"
    assert params.index.threads == 2
    assert params.index.store_positions and params.index.store_docvectors and params.index.store_raw
    assert params.retrieve.depth == 100
    assert params.retrieve.methods == ("bm25",)
    assert params.retrieve.bm25 == Bm25Config(k1=0.9, b=0.4)
    assert params.evaluate.measures == ("nDCG@10", "RR@10", "R@100")
    assert params.evaluate.baseline == "bm25"
    assert params.evaluate.include_shipped_runs is True
    assert params.schedule.cron == "0 3 * * *"


def test_params_are_frozen() -> None:
    params = parse_params(minimal())
    with pytest.raises((AttributeError, TypeError, ValueError)):
        params.retrieve.depth = 5  # type: ignore[misc]


def test_collection_lookup_names_the_known_collections() -> None:
    params = parse_params(minimal())
    assert params.collection("tiny").source == str(FIXTURE)
    with pytest.raises(ConfigError, match=r"'nosuch' is not defined under 'collections'.*tiny"):
        params.collection("nosuch")


def test_unknown_top_level_key_is_named_with_a_suggestion() -> None:
    message = config_error({**minimal(), "retreive": {"depth": 5}})
    assert "retreive: unknown key (did you mean 'retrieve'?)" in message


@pytest.mark.parametrize(
    ("section", "value", "key_path", "suggestion"),
    [
        ("retrieve", {"dpeth": 5}, "retrieve.dpeth", "depth"),
        ("retrieve", {"bm25": {"k": 1.2}}, "retrieve.bm25.k", "k1"),
        (
            "collections",
            {"tiny": {"source": "x", "min_relevence": 2}},
            "collections.tiny.min_relevence",
            "min_relevance",
        ),
        ("evaluation", {"tiny": {"splt": "test"}}, "evaluation.tiny.splt", "split"),
        ("prepare", {"on_unknown_qrel": "drop"}, "prepare.on_unknown_qrel", "on_unknown_qrels"),
        ("paths", {"colections": "x"}, "paths.colections", "collections"),
        # inside an optional section (EndpointConfig | None) and a tuple of files
        (
            "teacher",
            {"backend": "openai", "endpoint": {"base_url": "http://x", "model": "m", "timout_s": 3}},
            "teacher.endpoint.timout_s",
            "timeout_s",
        ),
        (
            "teacher",
            {"breaker": {"consecutive_failure": 3}},
            "teacher.breaker.consecutive_failure",
            "consecutive_failures",
        ),
    ],
)
def test_nested_mistyped_key_is_named_with_a_suggestion(
    section: str, value: dict, key_path: str, suggestion: str
) -> None:
    message = config_error({**minimal(), section: value})
    assert f"{key_path}: unknown key (did you mean {suggestion!r}?)" in message


def test_mistyped_required_key_reports_both_the_typo_and_the_missing_key() -> None:
    message = config_error({**minimal(), "collections": {"tiny": {"sorce": str(FIXTURE)}}})
    assert "collections.tiny.sorce: unknown key (did you mean 'source'?)" in message
    assert "collections.tiny.source: required key is missing" in message


def test_missing_required_section() -> None:
    raw = minimal()
    del raw["train"]
    assert "train: required key is missing" in config_error(raw)


def test_error_message_names_the_params_file(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", {**minimal(), "retrieve": {"dpeth": 5}})
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: invalid parameters")
    assert "retrieve.dpeth" in str(info.value)


@pytest.mark.parametrize(
    ("section", "value", "key_path", "got"),
    [
        ("retrieve", {"depth": "ten"}, "retrieve.depth", "'ten'"),
        ("retrieve", {"depth": 0}, "retrieve.depth", "0"),
        ("retrieve", {"methods": ["bm26"]}, "retrieve.methods.0", "'bm26'"),
        ("retrieve", {"bm25": {"b": 1.5}}, "retrieve.bm25.b", "1.5"),
        ("index", {"threads": "many"}, "index.threads", "'many'"),
        ("prepare", {"on_unknown_qrels": "maybe"}, "prepare.on_unknown_qrels", "'maybe'"),
    ],
)
def test_wrong_type_or_value_names_the_key_and_the_value(section: str, value: dict, key_path: str, got: str) -> None:
    message = config_error({**minimal(), section: value})
    assert f"  {key_path}: " in message
    assert f"(got {got})" in message


def test_invalid_enum_lists_the_allowed_values() -> None:
    message = config_error({**minimal(), "prepare": {"on_unknown_qrels": "maybe"}})
    assert "prepare.on_unknown_qrels" in message
    for allowed in ("'warn'", "'drop'", "'fail'"):
        assert allowed in message


def test_min_relevance_below_one_is_rejected() -> None:
    message = config_error({**minimal(), "collections": {"tiny": {"source": "x", "min_relevance": 0}}})
    assert "collections.tiny.min_relevance" in message


def test_unknown_ir_measures_measure() -> None:
    message = config_error({**minimal(), "evaluate": {"measures": ["nDCG@10", "Foo@3"]}})
    assert "evaluate.measures" in message
    assert "unknown ir_measures measure 'Foo@3'" in message


def test_known_ir_measures_measures_are_accepted() -> None:
    params = parse_params({**minimal(), "evaluate": {"measures": ["AP@100", "P@5", "nDCG@20", "R@1000"]}})
    assert params.evaluate.measures == ("AP@100", "P@5", "nDCG@20", "R@1000")


def test_train_referencing_an_undefined_collection() -> None:
    message = config_error({**minimal(), "train": {"collection": "tinny"}})
    assert "train.collection: collection 'tinny' is not defined under 'collections'" in message
    assert "did you mean 'tiny'?" in message


def test_evaluation_referencing_an_undefined_collection() -> None:
    message = config_error({**minimal(), "evaluation": {"tiny": {}, "scifakt": {"split": "test"}}})
    assert "evaluation.scifakt: collection 'scifakt' is not defined under 'collections'" in message


def test_invalid_collection_name() -> None:
    raw = minimal()
    raw["collections"]["bad name"] = {"source": "x"}
    assert "collections.bad name" in config_error(raw)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="parameters file not found") as info:
        load_params(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("collections:\n  tiny: {source: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_params(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_params(path)


def test_teach_targets_are_grouped_by_query_source() -> None:
    raw = minimal() | {
        "synthesize": {"tiny": {}},
        "teach": {"collection": {"tiny": {"split": "test"}}, "synthetic": {}},
    }
    assert parse_params(raw).teach["tiny"].queries == "collection"
    raw["teach"] = {"collection": {}, "synthetic": {"tiny": {"candidates": "pool"}}}
    assert parse_params(raw).teach["tiny"].queries == "synthetic"


@pytest.mark.parametrize(
    ("teach", "message"),
    [
        # the layout before the groups: named, with both groups
        ({"tiny": {"split": "test"}}, "teach.tiny: not a query source (teach targets are grouped: teach.collection"),
        ({"colection": {}}, "did you mean 'collection'?"),
        ({"collection": {"tiny": {"queries": "synthetic"}}}, "teach.collection.tiny.queries: unknown key (the group"),
        ({"collection": {"tiny": {}}, "synthetic": {"tiny": {}}}, "teach.collection.tiny, teach.synthetic.tiny: one"),
        # pydantic's errors name the key where it is in params.yaml, with the group
        ({"collection": {"tiny": {"deph": 3}}}, "teach.collection.tiny.deph: unknown key (did you mean 'depth'?)"),
        ({"synthetic": {"tiny": {}}}, "teach.synthetic.tiny: a target on synthesized queries needs synthesize.tiny"),
    ],
)
def test_teach_group_errors_name_the_key(teach: dict, message: str) -> None:
    assert message in config_error(minimal() | {"teach": teach})


def test_a_params_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = write_params(tmp_path / "params.yaml", tiny_params(tmp_path))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_params(path).collections["tiny"].source == str(FIXTURE)
