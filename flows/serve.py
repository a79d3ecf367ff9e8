"""``make serve``: a local Prefect server and the pipeline flow served on the schedule of params.yaml.

    python -m flows.serve [--params params.yaml] [--port 4200] [--no-server]

Starts ``prefect server start --host 127.0.0.1 --port <port>`` as a subprocess (its log goes to a file),
waits until its health endpoint answers, then serves ``distillrank_pipeline`` as a deployment whose schedule
is ``schedule.cron`` in ``schedule.timezone``. Ctrl-C stops serving (Prefect pauses the schedule) and then
the server. ``--no-server`` uses the server that ``PREFECT_API_URL`` already points at.

Only ``schedule`` and ``paths.metrics`` are read from ``--params``: the stages themselves read params.yaml,
which dvc.yaml names.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.pipeline_flow import distillrank_pipeline
from pipeline.config import DEFAULT_PARAMS_FILE, load_params

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
DEPLOYMENT_NAME = "scheduled"
STARTUP_TIMEOUT_SECONDS = 90.0
SERVER_LOG = Path(tempfile.gettempdir()) / "distillrank-prefect-server.log"
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def api_url(host: str, port: int) -> str:
    """The REST API of a Prefect server.

    >>> api_url("127.0.0.1", 4200)
    'http://127.0.0.1:4200/api'
    """
    return f"http://{host}:{port}/api"


def ui_url(api: str) -> str:
    """The UI that goes with an API URL.

    >>> ui_url("http://127.0.0.1:4200/api")
    'http://127.0.0.1:4200'
    """
    return api.removesuffix("/").removesuffix("/api")


def serve_arguments(params_file: Path | str, repo_dir: Path | str = ".", name: str = DEPLOYMENT_NAME) -> dict:
    """The keyword arguments of ``distillrank_pipeline.serve`` (and ``.to_deployment``): the deployment's
    name, its cron schedule and timezone from ``params_file``, and the flow parameters (absolute paths, so
    that the runs do not depend on the runner's directory)."""
    repo = Path(repo_dir).resolve()
    params_path = Path(params_file).resolve()
    schedule = load_params(params_path).schedule
    return {
        "name": name,
        "schedule": Cron(schedule.cron, timezone=schedule.timezone),
        "parameters": {"repo_dir": str(repo), "params_file": str(params_path)},
        "description": f"dvc repro of {repo}, stage by stage, on '{schedule.cron}' ({schedule.timezone})",
        "tags": ["distillrank", "dvc"],
        # flows.pipeline_flow.distillrank_pipeline, not a file path relative to the directory served from.
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }


def is_healthy(api: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect server answers on ``<api>/health``."""
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def prefect_server(host: str, port: int, timeout: float = STARTUP_TIMEOUT_SECONDS) -> Iterator[str]:
    """A ``prefect server start`` subprocess on ``host:port`` for the duration of the block; yields its API
    URL once healthy. A server that already answers there is used as is (and left running)."""
    api = api_url(host, port)
    if is_healthy(api):
        print(f"A Prefect server already answers at {api}: using it.")
        yield api
        return
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    print(f"Starting the Prefect server ({' '.join(command[1:])}); log: {SERVER_LOG}")
    with SERVER_LOG.open("w", encoding="utf-8") as log:
        # Its own session: Ctrl-C reaches only us, and the server outlives the runner's shutdown, which
        # pauses the deployment's schedule through the API.
        process = subprocess.Popen(
            command,
            env={**os.environ, **QUIET_ENV},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while not is_healthy(api):
            if process.poll() is not None:
                raise SystemExit(f"the Prefect server exited with {process.returncode}:\n{_log_tail(SERVER_LOG)}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the Prefect server did not answer within {timeout:.0f} s:\n{_log_tail(SERVER_LOG)}")
            time.sleep(0.5)
        yield api
    finally:
        print("Stopping the Prefect server.")
        _stop(process)


@contextmanager
def _existing_server() -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise SystemExit("--no-server: PREFECT_API_URL is not set (export PREFECT_API_URL=http://HOST:PORT/api)")
    if not is_healthy(api):
        raise SystemExit(f"--no-server: no Prefect server answers at {api}")
    yield api


def serve(arguments: dict[str, Any], api: str) -> None:
    """Serve the flow against the server at ``api`` until interrupted."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = api  # the flow-run subprocesses the runner starts
    schedule = arguments["schedule"]
    print(f"Prefect UI: {ui_url(api)}  (deployment distillrank-pipeline/{arguments['name']})")
    print(f"Schedule: '{schedule.cron}' ({schedule.timezone}); Ctrl-C to stop.")
    with temporary_settings(updates={PREFECT_API_URL: api}):
        distillrank_pipeline.serve(**arguments)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, help="params file (schedule)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port on {HOST}")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name")
    parser.add_argument("--no-server", action="store_true", help="use the running server PREFECT_API_URL points at")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    arguments = serve_arguments(args.params, Path.cwd(), args.name)
    # SIGTERM (e.g. from a process manager) unwinds like Ctrl-C, so that the server is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = _existing_server() if args.no_server else prefect_server(HOST, args.port)
    try:
        with server as api:
            serve(arguments, api)
    except KeyboardInterrupt:
        print("Interrupted.")


if __name__ == "__main__":
    main()
