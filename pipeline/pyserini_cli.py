"""Run a pyserini command-line module with this package's JVM workarounds (see ``pipeline.lucene``).

    python -m pipeline.pyserini_cli pyserini.search.lucene --index ... --topics ... --output ... --bm25

This is pyserini's own CLI, unchanged: it is how the pipeline indexes, and how tests check that our BM25
run equals the one pyserini's search CLI writes.
"""

from __future__ import annotations

import os
import runpy
import sys

from pipeline.lucene import start_jvm


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m pipeline.pyserini_cli <pyserini module> [args...]")
    module = sys.argv[1]
    start_jvm()
    # pyserini.search.lucene builds an OpenAI client at import time; the key is never used for BM25.
    os.environ.setdefault("OPENAI_API_KEY", "placeholder-for-pyserini-import")
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
