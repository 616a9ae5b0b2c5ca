"""Run files on a local disk or an object store (``gs://``, ``s3://``): one path layer.

Every file a run writes or reads outside its Orbax checkpoints (``config.json``,
``metrics.jsonl``, TensorBoard events, checkpoint manifests, caches, exports,
reports, data files, models and tokenizers) goes through these functions. Local
paths use ``os`` exactly as a plain program would; a URL (``<scheme>://...``) goes to
the fsspec filesystem that ``etils.epath`` uses for it (gcsfs for ``gs://``), the
layer Orbax itself writes checkpoints through, so a workdir on a bucket holds
everything a local one does.

Atomic writes (:func:`write_bytes`, :func:`write_text`, :func:`write_json`):

* Local: the content goes to ``<name>.tmp`` beside the file, which is then renamed
  over it (``os.replace``): a reader sees the old file or the new one, and a crash
  leaves at most the ``.tmp`` file.
* Object store: there is no rename, so the whole content is uploaded as a temporary
  object ``<name>.tmp-<random>``, copied server-side onto ``<name>`` and the temporary
  deleted. Each object write is atomic on GCS and S3 (an upload or copy becomes
  visible only when complete), so a reader sees the previous object or the complete
  new one, never a part, and a crash at any point leaves at most a stray temporary
  object. Writers are not serialised: of two concurrent writes the last to finish
  wins (a run's files are written by process 0 only).

Appends (:func:`open_append`): local files are appended to in place. An object
cannot be appended to, so :class:`RewritingAppender` keeps the content and rewrites
the whole object atomically on every ``flush``: the object always holds every line
flushed so far, in full.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_configured = False
_copies: dict[str, str] = {}  # URL -> its local copy, for this process
_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}  # fsspec's filesystem per scheme


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object-store location (``gs://bucket/key`` and alike)."""
    return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike) -> str:
    """``path`` with ``~`` expanded and made absolute; URLs are returned unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL."""
    base = os.fspath(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(path: str | os.PathLike) -> str:
    """The last component of ``path`` (a trailing slash ignored; local paths normalised)."""
    path = os.fspath(path)
    return os.path.basename(path.rstrip("/") if is_url(path) else os.path.normpath(path))


def _fs(path: str):
    """The fsspec filesystem ``etils.epath`` uses for the URL ``path``."""
    global _configured
    import fsspec
    from etils.epath import backend

    if not _configured:
        # A resume, another process or Orbax's own threads change the bucket behind
        # this process's back: listings are read fresh, never from a cache.
        for proto in ("gs", "gcs", "s3"):
            fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)
        _configured = True
    scheme = path.split("://", 1)[0]
    package = _PACKAGES.get(scheme)
    if package and importlib.util.find_spec(package) is None:
        raise ImportError(f"{path}: {scheme}:// paths need the {package} package: "
                          f"pip install {package}" + (" (or jaxalign[gcs])" if scheme == "gs"
                                                     else ""))
    if scheme in ("gs", "s3", "az", "hf"):
        return backend.fsspec_backend.fs(path)
    return fsspec.filesystem(scheme)


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or directory (for a URL: an object or a prefix of one) exists."""
    path = os.fspath(path)
    return _fs(path).exists(path) if is_url(path) else os.path.exists(path)


def isfile(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file (for a URL: an object)."""
    path = os.fspath(path)
    return _fs(path).isfile(path) if is_url(path) else os.path.isfile(path)


def isdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory (for a URL: a prefix of at least one object)."""
    path = os.fspath(path)
    return _fs(path).isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in directory ``path`` (unsorted for local paths, as ``os.listdir``).

    Raises:
      FileNotFoundError: ``path`` is no directory.
    """
    path = os.fspath(path)
    if not is_url(path):
        return os.listdir(path)
    fs = _fs(path)
    if not fs.isdir(path):
        raise FileNotFoundError(f"no directory {path}")
    return [basename(p) for p in fs.ls(path, detail=False) if basename(p)]


def walk_files(root: str | os.PathLike) -> list[str]:
    """The paths of every file under ``root``, relative to it, with ``/`` separators."""
    root = os.fspath(root)
    if not is_url(root):
        out = []
        for parent, _, files in os.walk(root):
            out += [os.path.relpath(os.path.join(parent, f), root) for f in files]
        return sorted(out)
    fs = _fs(root)
    prefix = fs._strip_protocol(root).rstrip("/") + "/"
    return sorted(p[len(prefix):] for p in fs.find(root) if p.startswith(prefix))


def glob(pattern: str) -> list[str]:
    """The files matching ``pattern`` (``~`` expanded), sorted; URLs keep their scheme."""
    if not is_url(pattern):
        import glob as globlib

        return sorted(p for p in globlib.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    fs = _fs(pattern)
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{p}" for p in fs.glob(pattern) if fs.isfile(p))


def getsize(path: str | os.PathLike) -> int:
    """The size of file ``path`` in bytes."""
    path = os.fspath(path)
    return int(_fs(path).size(path)) if is_url(path) else os.path.getsize(path)


def makedirs(path: str | os.PathLike) -> None:
    """Creates directory ``path`` and its parents (object stores need none: a no-op)."""
    path = os.fspath(path)
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def open_read(path: str | os.PathLike, mode: str = "rb") -> IO[Any]:
    """Opens ``path`` for reading (``"rb"`` or ``"r"``, UTF-8); a file object."""
    path = os.fspath(path)
    if mode not in ("r", "rb"):
        raise ValueError(f"open_read: mode {mode!r}; expected 'r' or 'rb'")
    if not is_url(path):
        return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))  # noqa: SIM115
    return _fs(path).open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of file ``path``."""
    path = os.fspath(path)
    if is_url(path):
        return _fs(path).cat_file(path)
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of file ``path``."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces file ``path`` by ``data`` atomically (see the module docstring)."""
    path = os.fspath(path)
    if not is_url(path):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs = _fs(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    fs.pipe_file(tmp, data)
    try:
        fs.copy(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            fs.rm_file(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replaces file ``path`` by the UTF-8 ``text`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """Replaces file ``path`` by ``obj`` as JSON (``json.dumps(obj, **dumps)``) atomically."""
    write_text(path, json.dumps(obj, **dumps))


def remove(path: str | os.PathLike) -> None:
    """Deletes file ``path`` if it exists."""
    path = os.fspath(path)
    if is_url(path):
        fs = _fs(path)
        if fs.isfile(path):
            fs.rm_file(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class RewritingAppender:
    """An append-only file on an object store: every ``flush`` rewrites the object.

    The existing object's content is read once at open; ``write`` buffers, ``flush``
    uploads the whole content atomically (:func:`write_bytes`). Cost per flush grows
    with the file, which suits metrics and event logs (kilobytes to a few megabytes).
    """

    def __init__(self, path: str, binary: bool):
        self.path, self.binary = path, binary
        self._parts = [read_bytes(path)] if isfile(path) else []
        self._dirty = not self._parts  # an opened file exists, if empty, as locally
        self.closed = False

    def write(self, data: str | bytes) -> int:
        """Buffers ``data`` (text is written as UTF-8); returns its length."""
        self._parts.append(data if isinstance(data, bytes) else data.encode("utf-8"))
        self._dirty = True
        return len(data)

    def flush(self) -> None:
        """Rewrites the object with everything written so far (if anything changed)."""
        if self._dirty:
            content = b"".join(self._parts)
            self._parts = [content]
            write_bytes(self.path, content)
            self._dirty = False

    def close(self) -> None:
        """Flushes; later writes are not uploaded."""
        if not self.closed:
            self.flush()
            self.closed = True


def open_append(path: str | os.PathLike, binary: bool = False) -> IO[Any] | RewritingAppender:
    """Opens ``path`` for appending (text in UTF-8, or bytes); ``write``/``flush``/``close``."""
    path = os.fspath(path)
    if is_url(path):
        return RewritingAppender(path, binary)
    return open(path, "ab" if binary else "a", **({} if binary else {"encoding": "utf-8"}))  # noqa: SIM115


def download_dir(path: str, local: str) -> None:
    """Copies every file under the URL ``path`` into the local directory ``local``."""
    fs = _fs(path)
    for rel in walk_files(path):
        dest = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(join(path, rel), dest)


@contextlib.contextmanager
def local_dir(path: str | os.PathLike) -> Iterator[str]:
    """A local directory holding directory ``path``: itself, or a temporary download."""
    path = os.fspath(path)
    if not is_url(path):
        yield path
        return
    if not isdir(path):
        raise FileNotFoundError(f"no directory {path}")
    with tempfile.TemporaryDirectory(prefix="jaxalign-") as tmp:
        download_dir(path, tmp)
        yield tmp


def local_copy(path: str, siblings: tuple[str, ...] = ()) -> str:
    """A local path holding ``path`` (a file or a directory): itself when local, else a
    copy downloaded once per process into a temporary directory removed at exit.

    For readers that need a real file (memory-mapped safetensors and GGUF, tokenizer
    libraries). ``siblings`` names files beside a file ``path`` to fetch with it when
    they exist (e.g. ``tokenizer_config.json``).

    Raises:
      FileNotFoundError: ``path`` does not exist (the message names the URL).
    """
    if not is_url(path):
        return path
    path = path.rstrip("/")
    if path in _copies:
        return _copies[path]
    if not exists(path):
        raise FileNotFoundError(f"{path} not found")
    root = tempfile.mkdtemp(prefix="jaxalign-copy-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    local = os.path.join(root, basename(path))
    if isdir(path):
        os.makedirs(local)
        download_dir(path, local)
    else:
        _fs(path).get_file(path, local)
        parent = path.rsplit("/", 1)[0]
        for name in siblings:
            if isfile(join(parent, name)):
                _fs(path).get_file(join(parent, name), os.path.join(root, name))
    _copies[path] = local
    return local


def upload_dir(local: str, path: str) -> None:
    """Copies every file under the local directory ``local`` to the URL ``path``."""
    fs = _fs(path)
    for rel in walk_files(local):
        fs.put_file(os.path.join(local, rel), join(path, rel.replace(os.sep, "/")))


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[str]:
    """A local directory to write ``path``'s files into: itself (created), or a
    temporary one uploaded to the URL ``path`` when the block ends without error."""
    path = os.fspath(path)
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="jaxalign-") as tmp:
        yield tmp
        upload_dir(tmp, path)


def copy_tree(src: str, dst: str) -> None:
    """Copies directory ``src`` to ``dst``; either may be a URL."""
    if not is_url(src) and not is_url(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif not is_url(src):
        upload_dir(src, dst)
    elif not is_url(dst):
        download_dir(src, dst)
    else:
        with local_dir(src) as tmp:
            upload_dir(tmp, dst)
