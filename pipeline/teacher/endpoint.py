"""The endpoint the teacher is called at: the configured OpenAI-compatible one, the embedded llama.cpp server, or
the replaying teacher's server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, EndpointConfig, Paths, TeacherConfig
from pipeline.teacher.outcome import Pool


@contextlib.contextmanager
def teacher_endpoint(
    teacher: TeacherConfig,
    paths: Paths,
    pool: Pool | None = None,
    report: dict[str, Any] | None = None,
    server_log: Path | None = None,
) -> Iterator[EndpointConfig]:
    """The endpoint to call: the configured one, or a local server (embedded, replay) for as long as it is needed.
    The replaying teacher answers the listwise prompts about ``pool``'s candidates (the teach stage's), and puts
    what it served under ``report["replay"]`` when the context ends. The embedded server logs to ``server_log``
    (when given) rather than to the console."""
    if teacher.backend == "openai":
        assert teacher.endpoint is not None  # checked when params are read
        yield teacher.endpoint
        return
    if teacher.backend == "replay":
        from pipeline.teacher.replay import replay_server
        from pipeline.teacher.templates import load_template

        if pool is None or teacher.method != "listwise":
            raise ConfigError(
                "teacher.backend: 'replay' answers the teach stage's listwise prompts only "
                f"(here: method {teacher.method!r}{'' if pool else ', outside a teach stage'})"
            )
        with replay_server(teacher.replay, load_template(teacher.listwise.template), pool) as replay:
            try:
                yield replay.endpoint()
            finally:
                if report is not None:
                    report["replay"] = replay.summary()
        return
    from pipeline.teacher.embedded import assemble_model, embedded_server

    model_file = assemble_model(paths.models)
    with embedded_server(model_file, teacher.embedded.n_ctx, teacher.embedded.threads, log_file=server_log) as base_url:
        # one llama.cpp slot: concurrent requests would only queue up behind each other
        yield EndpointConfig(base_url=base_url, model=teacher.embedded.model_name, api_key_env=None, max_concurrency=1)
