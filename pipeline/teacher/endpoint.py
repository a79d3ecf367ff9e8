"""The endpoint the teacher is called at: the configured OpenAI-compatible one, or the embedded llama.cpp server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pipeline.config import EndpointConfig, Paths, TeacherConfig


@contextlib.contextmanager
def teacher_endpoint(teacher: TeacherConfig, paths: Paths) -> Iterator[EndpointConfig]:
    """The endpoint to call: the configured one, or the embedded llama.cpp server for as long as it is needed."""
    if teacher.backend == "openai":
        assert teacher.endpoint is not None  # checked when params are read
        yield teacher.endpoint
        return
    from pipeline.teacher.embedded import assemble_model, embedded_server

    model_file = assemble_model(paths.models)
    with embedded_server(model_file, teacher.embedded.n_ctx, teacher.embedded.threads) as base_url:
        # one llama.cpp slot: concurrent requests would only queue up behind each other
        yield EndpointConfig(base_url=base_url, model=teacher.embedded.model_name, api_key_env=None, max_concurrency=1)
