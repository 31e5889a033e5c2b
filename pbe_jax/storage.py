"""Where files live: one path type for local folders and object stores, and the writes that keep "a file is
complete or absent" on both.

Every file the project reads or writes goes through `path()`, an `etils.epath.Path` (what orbax and TFDS use):
local paths, and `gs://…` (also `s3://`, `az://`). On gs:// epath goes through `tf.io.gfile` when TensorFlow
is installed and through fsspec's `gcsfs` otherwise (`EPATH_USE_TF=false` chooses gcsfs; the tests do, to reach
a local emulator, which TensorFlow's GCS client cannot be pointed at). orbax writes checkpoint arrays through
tensorstore's own GCS driver (`check_checkpoint_store` says so clearly when that driver cannot reach the bucket).

How writes stay all-or-nothing:
- A local file is written under a temporary name beside it and renamed over the target (`os.replace`).
- An object store has no rename, but an object becomes visible only when its upload completes. So an
  object is written in one piece, from bytes already complete in memory (`write_bytes`): an interrupted
  upload leaves no object, or the previous version. A writer opened on an object is never closed after an
  error, since closing it would commit what it holds; that is why nothing here streams into one.
- A folder (an export) is replaced locally by writing a sibling `.partial` folder and renaming it. On an
  object store the old folder is removed and the new one written file by file with its index file
  (`model_index.json`) last; readers treat a folder without it as absent (`pbe_jax.convert.load` does).
- Logs that grow (metrics, TensorBoard events, failure lists) are appended to locally; on an object store
  the whole object is rewritten from memory (`AppendLog`), at most every `min_interval_s` and on close.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
from typing import Callable, TypeVar

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike
REMOTE_PREFIXES = ("gs://", "s3://", "az://")
TIMEOUT_ENV = "PBE_JAX_STORAGE_TIMEOUT"  # seconds to wait for an object store before giving up (default 120)

T = TypeVar("T")


class StorageError(OSError):
    """An object store that cannot be reached or written; the message names the path and what to check."""


def path(p: PathLike) -> Path:
    """`p` as the project's path type (local or `gs://…`)."""
    return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p))


def is_remote(p: PathLike) -> bool:
    return os.fspath(p).startswith(REMOTE_PREFIXES)


def write_bytes(dst: PathLike, data: bytes) -> None:
    """Write `data` to `dst` so that a reader sees the old file or the new one, never a part (see above)."""
    dst = path(dst)
    if is_remote(dst):
        dst.write_bytes(data)  # one upload of complete bytes: the object appears only when it has finished
        return
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dst)


def write_text(dst: PathLike, text: str) -> None:
    write_bytes(dst, text.encode())


def write_with(dst: PathLike, write: Callable[[str], object]) -> None:
    """For writers that need a local file name (PIL, safetensors): `write(local_name)`, then that file moved
    to `dst` all at once: renamed beside it locally, uploaded in one piece to an object store."""
    dst = path(dst)
    if not is_remote(dst):
        tmp = dst.with_name(f"{dst.stem}.tmp{dst.suffix}")  # the suffix kept: some writers add theirs otherwise
        write(os.fspath(tmp))
        os.replace(tmp, dst)
        return
    with tempfile.TemporaryDirectory(prefix="pbe_jax_upload_") as folder:
        local = os.path.join(folder, dst.name)
        write(local)
        with open(local, "rb") as f:
            data = f.read()
    dst.write_bytes(data)


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def local_or_buffer(p: PathLike) -> str | io.BytesIO:
    """What readers that take a file name or a file object (PIL, numpy) should open: the local file name, or
    the object's bytes in memory."""
    return os.fspath(p) if not is_remote(p) else io.BytesIO(path(p).read_bytes())


def names(folder: PathLike) -> set[str]:
    """The names in `folder`, in one listing; none for a folder that does not exist (an object store has no
    empty folders: one that nothing has been written to yet is absent)."""
    folder = path(folder)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def refresh(p: PathLike) -> None:
    """Forget cached listings under an object-store path: gcsfs caches folder listings, so what another process
    wrote since this one last listed a folder is otherwise not seen (tf.io.gfile keeps no such cache)."""
    if is_remote(p):
        from etils.epath import backend

        try:
            backend.fsspec_backend.fs(os.fspath(p)).invalidate_cache()
        except ImportError:  # no fsspec for this scheme: epath uses tf.io.gfile
            pass


def remove_tree(p: PathLike) -> None:
    p = path(p)
    if is_remote(p):
        if p.exists():
            p.rmtree()
    else:
        shutil.rmtree(p, ignore_errors=True)


def replace_folder(folder: PathLike, write: Callable[[Path], object]) -> Path:
    """Replace `folder` by what `write(target)` writes, never leaving a mix of old and new files: locally
    `write` fills `folder.partial`, which is then renamed; on an object store the old folder is removed first
    and `write` must write its index file last (see the module docstring)."""
    folder = path(folder)
    if is_remote(folder):
        remove_tree(folder)
        write(folder)
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    remove_tree(tmp)
    write(tmp)
    remove_tree(folder)
    os.rename(tmp, folder)
    return folder


class AppendLog:
    """A file that only grows (JSON lines, TensorBoard event records), continued if it exists (`append`) or
    started anew. Locally each `write` is appended and flushed at once. On an object store, which cannot append,
    the content is kept in memory (from the object's current content when continuing) and the whole object is
    rewritten, complete, at most every `min_interval_s` seconds and on `flush()`/`close()`."""

    def __init__(self, p: PathLike, *, append: bool = True, min_interval_s: float = 30.0):
        self.path = path(p)
        self.remote = is_remote(self.path)
        self.min_interval_s = min_interval_s
        if self.remote:
            existing = self.path.read_bytes() if append and self.path.exists() else b""
            self._content = bytearray(existing)
            self._dirty, self._written_at = not append, float("-inf")  # the first write uploads at once
        else:
            self._file = open(self.path, "ab" if append else "wb")

    def write(self, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        if not self.remote:
            self._file.write(data)
            self._file.flush()
            return
        self._content += data
        self._dirty = True
        if time.monotonic() - self._written_at >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        if self.remote and self._dirty:
            write_bytes(self.path, bytes(self._content))
            self._dirty, self._written_at = False, time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self._file.close()


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, 120))


def within(seconds: float, fn: Callable[[], T], what: str) -> T:
    """`fn()`, or a StorageError naming `what` if it has not returned after `seconds`: object-store clients
    retry for many minutes before failing, and a run that waits silently looks like a hang."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StorageError(f"{what}: no answer within {seconds:.0f} s ({TIMEOUT_ENV} sets the limit). "
                           f"{_hint(what)}")
    if "error" in result:
        e = result["error"]
        raise StorageError(f"{what}: {type(e).__name__}: {e}. {_hint(what)}") from e
    return result["value"]


def _hint(what: str) -> str:
    if "gs://" not in what:
        return ""
    return ("Check the credentials (`gcloud auth application-default login`, or the VM's service account and its "
            "access to the bucket) and the network; for a local emulator set STORAGE_EMULATOR_HOST (gcsfs, with "
            "EPATH_USE_TF=false) and TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore).")


def check_reachable(p: PathLike) -> None:
    """For an object-store path, fail fast and clearly when the store does not answer (no-op locally)."""
    if is_remote(p):
        within(timeout_s(), lambda: path(p).exists(), f"reaching {os.fspath(p)}")


def check_checkpoint_store(directory: PathLike) -> None:
    """orbax writes checkpoint arrays with tensorstore's GCS driver, a client of its own: write, read and
    delete a probe object through it, so that an unreachable bucket is a clear error at the start of a run
    rather than minutes of silent retries at the first checkpoint. No-op for local and non-gs:// paths."""
    directory = os.fspath(directory)
    if not directory.startswith("gs://"):
        return
    import tensorstore as ts

    bucket, _, prefix = directory[len("gs://"):].partition("/")
    key = f".pbe_jax_probe_{os.getpid()}_{time.time_ns()}"

    def probe():
        kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix.rstrip("/") + "/"}).result()
        kv.write(key, b"ok").result()
        if kv.read(key).result().value != b"ok":
            raise StorageError("the probe object read back differently")
        kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()

    within(timeout_s(), probe, f"writing checkpoint arrays under {directory} through tensorstore's GCS driver "
                               f"(what orbax uses)")
