"""Regenerate presets/*.yaml from params.yaml: each preset is params.yaml with a few sections replaced, and a
header naming them (tests/test_presets.py checks that every other section is identical).

    .venv/bin/python presets/make_presets.py    # after editing params.yaml
"""

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
base = yaml.safe_load((REPO / "params.yaml").read_text())


def write(name, header, changes):
    params = copy.deepcopy(base)
    for key, value in changes.items():
        params[key] = value
    text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    text += f"# differs from params.yaml in: {', '.join(changes)}\n\n"
    text += yaml.safe_dump(params, sort_keys=False, width=120)
    (REPO / "presets" / f"{name}.yaml").write_text(text)


# The MiniLM cross-encoder (a sentence-transformers CrossEncoder; its head starts random), RankNet on TWOLAR's targets.
CROSS_ENCODER = {
    "kind": "cross-encoder",
    "backbone": "all-MiniLM-L6-v2",
    "labels": "scifact",
    "loss": "ranknet",
    "max_length": "auto",
    "precision": "auto",
    "group_size": 16,
    "groups_per_list": 2,
    "queries_per_batch": 2,
    "gradient_accumulation": 1,
    "epochs": 1.0,
    "max_steps": None,
    "learning_rate": 5.0e-5,
    "weight_decay": 0.01,
    "warmup_ratio": 0.1,
    "scheduler": "linear",
    "eval_every": 25,
    "keep_best": False,
    "seed": 0,
}

splade_target = {
    "split": "test",
    "depth": 10,
    "max_queries": None,
    "candidates": "shipped-union",
    "seed": 0,
    "method": "imported",
    "imported": {
        "scope": "pool",
        "files": [
            {
                "path": "../shared/data/trec-dl-2019/runs/splade-pp-ed.trec",
                "teacher": "splade-pp-ed",
                "first_stage": "shipped-union",
            }
        ],
    },
}
write(
    "strong-teacher",
    """Preset: a strong teacher through imported labels (issue 5). The TREC-DL 2019 `splade-pp-ed` run (nDCG@10
0.7308) ranks the union of the top 10 of the five first stages TREC-DL 2019 ships, for its 43 queries; the
MiniLM cross-encoder learns from those rankings and is measured out of domain, on SciFact test. Users who already
have a strong LLM's rerank output (a TREC run, or rank_llm JSON) run exactly this with their own file.
  make preset PRESET=strong-teacher      (git checkout params.yaml returns to the default)
TREC-DL 2019 is not an evaluation collection here: its queries are the training data.""",
    {
        "synthesize": {},
        "teach": {"synthetic": {}, "collection": {"trec-dl-2019": splade_target}},
        "students": {"minilm-ce-splade": {**CROSS_ENCODER, "labels": "trec-dl-2019"}},
        "evaluation": {"scifact": {"split": "test"}},
    },
)

write(
    "recorded-teacher",
    """Preset: distil the recorded real LLM teachers only (issue 10): TREC-DL 2019's six ranked lists per query
(GPT-3.5 RankGPT over BM25, RankVicuna-7B over five first stages), minus the held-out dev queries, into the MiniLM
bi-encoder and the MiniLM cross-encoder, each next to its untrained start, BM25 and every teacher on the held-out
queries (and SciFact test out of domain). No live LLM call: what a user with rank_llm output runs.
  make preset PRESET=recorded-teacher    (git checkout params.yaml returns to the default)""",
    {
        "synthesize": {},
        "teach": {"synthetic": {}, "collection": {"trec-dl-2019": base["teach"]["collection"]["trec-dl-2019"]}},
        "students": {
            "minilm-bi": base["students"]["minilm-bi"],
            "minilm-ce": {**CROSS_ENCODER, "labels": "trec-dl-2019"},
        },
    },
)

teacher = copy.deepcopy(base["teacher"])
teacher["method"] = "rationales"
r2r = {
    "kind": "r2r",
    "backbone": "SmolLM2-135M-Instruct",
    "labels": "scifact",
    "loss": "listnet",
    "max_length": 128,
    "group_size": 5,
    "queries_per_batch": 1,
    "gradient_accumulation": 1,
    "epochs": 1.0,
    "max_steps": 12,
    "learning_rate": 1.0e-4,
    "weight_decay": 0.0,
    "warmup_ratio": 0.1,
    "scheduler": "linear",
    "eval_every": 6,
    "seed": 0,
    "r2r": {"learn_weights": True, "initial_weight": 0.5, "fixed_weights": [1.0, 1.0, 1.0], "max_reason_tokens": 48},
}
ce = dict(CROSS_ENCODER)
teach = copy.deepcopy(base["teach"])
teach["synthetic"]["scifact"].update(depth=5, max_queries=3)
write(
    "r2r-embedded",
    """Preset: Reason-to-Rank (issue 6). The teacher ranks windows of 5 pool candidates and gives, for each passage,
a direct and a comparative reason (table `rationales`); a SmolLM2-135M student learns to rank (ListNet + MSE) and
to explain (generation loss) with learned loss weights, next to the MiniLM cross-encoder on the same labels.
Sized for 2 CPU cores (a window takes the embedded teacher 3-10 minutes): 3 synthesized queries, one window
each; the students rerank the top 10 of 10 SciFact test queries and of 10 TREC-DL 2019 queries, every run
measured on those same queries (an LM student is slow on a CPU).
  make preset PRESET=r2r-embedded        (git checkout params.yaml returns to the default)
  distillrank explain --model data/students/r2r-smollm2 --collection ../shared/data/trec-dl-2019 \\
      --run ../shared/data/trec-dl-2019/runs/bm25.trec --query-id 1037798""",
    {
        "teacher": teacher,
        "teach": teach,
        "students": {"minilm-ce": ce, "r2r-smollm2": r2r},
        "rerank": {**base["rerank"], "depth": 10},
        "evaluation": {
            "scifact": {"split": "test", "max_queries": 10, "seed": 0},
            "trec-dl-2019": {"split": "test", "max_queries": 10, "seed": 0},
        },
    },
)

R2R_FILE = "../shared/data/r2r-msmarco/r2r-gpt4-msmarco-train.jsonl"
r2r_real = {
    **r2r,
    "labels": "r2r-msmarco",
    "max_length": 192,  # 99% of the file's prompts (query + passage) fit
    "epochs": 2.0,
    "max_steps": None,
    "eval_every": 25,
    "keep_best": False,  # the dev queries are the reported figures': no checkpoint is chosen on them
    "r2r": {
        **r2r["r2r"],
        "max_reason_tokens": 128,  # 98% of the targets (direct + comparative + answer) fit
        "answer_sentence": True,
        "faithfulness_passages": None,  # every dev passage
    },
}
write(
    "r2r",
    """Preset: Reason-to-Rank with a real teacher (issue 13). The Reason-to-Rank project's own GPT-4 teacher file
(100 MS MARCO train queries, 5 BM25 candidates each, GPT-4's permutation and, per passage, a direct reason, a
comparative reason and an answer sentence) is imported as it is (format r2r-jsonl): the file is a collection of its
own (r2r-msmarco) and the teacher's labels with their rationales. build holds out a seeded quarter of the queries
(dev, never trained on); a SmolLM2-135M R2R student learns to rank and to explain (ListNet + MSE + generation,
learned weights), next to the MiniLM cross-encoder on the same labels; both rerank TREC-DL 2019's BM25 top 20.
metrics/students/<name>.json: ranking fidelity on the dev queries (nDCG@5/@10 against GPT-4's order, Kendall's
tau) and, for R2R, ROUGE-L of its reasons against GPT-4's on every dev passage.
  make preset PRESET=r2r                 (git checkout params.yaml returns to the default)
  distillrank explain --model data/students/r2r-smollm2 --collection ../shared/data/trec-dl-2019 \\
      --run ../shared/data/trec-dl-2019/runs/bm25.trec --query-id 1037798 --depth 5""",
    {
        "collections": {
            "r2r-msmarco": {"source": R2R_FILE, "format": "r2r-jsonl"},
            "trec-dl-2019": base["collections"]["trec-dl-2019"],
        },
        "train": {"collection": "r2r-msmarco", "split": "train"},
        "evaluation": {"trec-dl-2019": {"split": "test"}},
        "retrieve": {**base["retrieve"], "per_collection": {"r2r-msmarco": ["bm25"], "trec-dl-2019": ["bm25"]}},
        "synthesize": {},
        "teach": {
            "synthetic": {},
            "collection": {
                "r2r-msmarco": {
                    "split": "train",
                    "depth": 5,
                    "max_queries": None,
                    "candidates": "shipped-union",  # the file's own BM25 candidates, in the order GPT-4 saw them
                    "seed": 0,
                    "method": "imported",
                    "imported": {
                        "scope": "file",
                        "files": [{"path": R2R_FILE, "teacher": "gpt-4", "first_stage": "bm25", "format": "r2r-jsonl"}],
                    },
                }
            },
        },
        "students": {
            "r2r-smollm2": r2r_real,
            "minilm-ce": {**CROSS_ENCODER, "labels": "r2r-msmarco", "group_size": 5, "epochs": 4.0},
        },
        "rerank": {**base["rerank"], "depth": 20},
    },
)

teacher = copy.deepcopy(base["teacher"])
teacher.update(
    backend="openai",
    method="listwise",
    endpoint={
        "base_url": "https://api.openai.com/v1",
        "model": "gpt-4o-mini",
        "api_key_env": "OPENAI_API_KEY",
        "timeout_s": 120,
        "max_retries": 5,
        "max_concurrency": 16,
    },
)
teacher["listwise"] = {**teacher["listwise"], "window": 20, "step": 10}
synth = copy.deepcopy(base["synthesize"])
synth["scifact"].update(cropped=10000, generated=10000, dev_fraction=0.02)
t5 = {
    "kind": "twolar-seq2seq",
    "backbone": "google/flan-t5-xl",
    "labels": "scifact",
    "loss": "ranknet",
    "max_length": 512,
    "group_size": None,
    "queries_per_batch": 2,
    "gradient_accumulation": 16,
    "epochs": 1.0,
    "max_steps": None,
    "learning_rate": 1.0e-4,
    "weight_decay": 0.0,
    "warmup_ratio": 0.05,
    "scheduler": "linear",
    "eval_every": 100,
    "seed": 0,
}
write(
    "full",
    """Preset: TWOLAR at paper scale (issue 5): 10K cropped + 10K generated queries, 4-retriever pools of 30, a
listwise LLM teacher (RankGPT window 20, step 10) over an OpenAI-compatible endpoint (the paper: gpt-3.5-turbo),
a Flan-T5-XL student trained with RankNet on a GPU, students reranking BM25's top 100.
Needs a model hub (Flan-T5), an API key in OPENAI_API_KEY, and a GPU. Rough cost: 20K queries x 3 listwise
windows = 60K teacher calls; Flan-T5-XL, 1 epoch over 20K groups of 30 on one A100/H100: a few hours.
  make preset PRESET=full""",
    {
        "teacher": teacher,
        "synthesize": synth,
        "teach": {
            "synthetic": {
                "scifact": {
                    "split": "train,dev",
                    "depth": 30,
                    "max_queries": None,
                    "candidates": "pool",
                    "seed": 0,
                }
            },
            "collection": {"trec-dl-2019": base["teach"]["collection"]["trec-dl-2019"]},
        },
        "students": {"flan-t5-xl": t5},
        "rerank": {**base["rerank"], "depth": 100, "batch_size": 64},
        "retrieve": {
            **base["retrieve"],
            "per_collection": {},
            "dense": {**base["retrieve"]["dense"], "max_length": 256},
        },
    },
)
