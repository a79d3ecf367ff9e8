"""Training groups: one per (query, ranked list) of the training examples, the unit every student kind learns from.

A group is one teacher's ranking of one query's candidates (``list`` = ``teacher@first_stage``), in the teacher's
order, with TWOLAR's targets ``1 / (teacher_rank + 1)``. Several lists of one query are several groups: they are
never merged (``build`` states the policy). ``group_size`` cuts a group the same way for every kind: the teacher's
top passage and a uniform sample of the rest, drawn anew each time the group is used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch


@dataclass(frozen=True)
class Group:
    """One teacher's ranking of one query's candidates, in teacher order."""

    query_id: str
    list: str
    query: str
    doc_ids: tuple[str, ...]
    passages: tuple[str, ...]
    targets: tuple[float, ...]
    teacher_ranks: tuple[int, ...]

    def subset(self, index: Sequence[int]) -> Group:
        """The group restricted to the candidates at ``index`` (kept in teacher order)."""
        keep = sorted(index)
        return Group(
            self.query_id,
            self.list,
            self.query,
            tuple(self.doc_ids[i] for i in keep),
            tuple(self.passages[i] for i in keep),
            tuple(self.targets[i] for i in keep),
            tuple(self.teacher_ranks[i] for i in keep),
        )


def training_split(student: str, labels: str, examples: pd.DataFrame) -> tuple[list[Group], list[Group]]:
    """The train and dev groups of ``examples``; an error naming ``students.<student>`` when nothing is left to
    train on."""
    train, dev = query_groups(examples, "train"), query_groups(examples, "dev")
    if not train:
        raise ValueError(f"students.{student}: no training queries in the examples of {labels!r}")
    return train, dev


def split_counts(train: list[Group], dev: list[Group]) -> dict[str, int]:
    """What a training summary says of its data.

    >>> g = Group("q1", "a", "x", ("d1", "d2"), ("y", "z"), (0.5, 0.3), (1, 2))
    >>> split_counts([g, Group("q1", "b", "x", ("d1",), ("y",), (0.5,), (1,))], [])
    {'train_queries': 1, 'train_groups': 2, 'train_pairs': 3, 'dev_queries': 0}
    """
    return {
        "train_queries": len({g.query_id for g in train}),
        "train_groups": len(train),
        "train_pairs": sum(len(g.doc_ids) for g in train),
        "dev_queries": len({g.query_id for g in dev}),
    }


def query_groups(examples: pd.DataFrame, split: str) -> list[Group]:
    """One group per (query, list) of ``split``, sorted by query then list, candidates in teacher order.

    >>> ex = pd.DataFrame({"query_id": ["q", "q", "q"], "list": ["a", "a", "b"], "query": "x",
    ...                    "doc_id": ["d2", "d1", "d1"], "passage": ["y", "x", "x"], "teacher_rank": [2, 1, 1],
    ...                    "target": [1 / 3, 0.5, 0.5], "split": "train"})
    >>> [(g.list, g.doc_ids) for g in query_groups(ex, "train")]
    [('a', ('d1', 'd2')), ('b', ('d1',))]
    """
    part = examples[examples["split"] == split]
    if "list" not in part:
        part = part.assign(list="teacher")
    part = part.sort_values(["query_id", "list", "teacher_rank"], kind="stable")
    return [
        Group(
            query_id=str(query_id),
            list=str(list_name),
            query=str(frame["query"].iloc[0]),
            doc_ids=tuple(map(str, frame.doc_id)),
            passages=tuple(map(str, frame.passage)),
            targets=tuple(map(float, frame.target)),
            teacher_ranks=tuple(map(int, frame.teacher_rank)),
        )
        for (query_id, list_name), frame in part.groupby(["query_id", "list"], sort=True)
    ]


def sample_indices(size: int, group_size: int | None, rng: random.Random) -> list[int]:
    """Which candidates of a group of ``size`` to use: all of them (``group_size`` None or not smaller), else the
    teacher's top one (index 0, so every listwise target keeps its peak) and ``group_size - 1`` others drawn
    uniformly, in teacher order.

    >>> sample_indices(3, None, random.Random(0)), sample_indices(3, 5, random.Random(0))
    ([0, 1, 2], [0, 1, 2])
    >>> picked = sample_indices(10, 4, random.Random(0))
    >>> picked[0], len(picked), picked == sorted(picked)
    (0, 4, True)
    """
    if group_size is None or size <= group_size:
        return list(range(size))
    return [0, *sorted(rng.sample(range(1, size), group_size - 1))]


class GroupDataset(torch.utils.data.Dataset):
    """Groups as a map-style dataset (one item = one group); a collator turns a batch of them into tensors."""

    def __init__(self, groups: list[Group]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Group:
        return self.groups[index]
