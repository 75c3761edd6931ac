"""Where a trace lies: a local path, or an fsspec URL (file://, s3://, gs://, ...).

A `file://` URL is a local path. Any other URL is opened through fsspec as a random-access file (h5py and
pyarrow both read Python file objects), so a reader fetches only the byte ranges it reads: a cluster worker
replaying one shard of a trace in an object store downloads that shard's rows, not the file. fsspec is
imported only for such URLs (it comes with the `cluster` extra; s3:// needs s3fs, gs:// gcsfs).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from traces.errors import InputError

Location = Path | str  # a local file, or the URL of a remote one


def is_url(text: str) -> bool:
    """True for `proto://...` and fsspec's chained `a::b://...` forms."""
    return "://" in text or "::" in text


def file_url_path(text: str) -> Path | None:
    """The local path of a plain file:// URL (file:///abs/path or file://localhost/abs/path), else None."""
    if not text.startswith("file://") or "::" in text:
        return None
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise InputError(f"{text}: a file:// URL names a file on this machine (file:///path), not on "
                         f"{parts.netloc}")
    return Path(unquote(parts.path))


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise InputError("reading a trace from a URL needs fsspec: pip install 'moe-trace[cluster]' (and "
                         "s3fs for s3://, gcsfs for gs://)") from None
    return fsspec


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        return _fsspec().core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package is missing
        raise InputError(f"{url}: cannot open this URL ({_first_line(exc)})") from None


def expand(items: str | Path | Sequence[str | Path]) -> list[Location]:
    """Paths and URLs with their globs expanded, in order. A pattern that matches nothing is an error; a plain
    missing file is reported when it is opened."""
    given = [items] if isinstance(items, str | Path) else list(items)
    out: list[Location] = []
    for item in given:
        text = str(item)
        local = Path(text) if not is_url(text) else file_url_path(text)
        if local is not None:
            if glob.has_magic(str(local)):
                matches = sorted(glob.glob(str(local)))
                if not matches:
                    raise InputError(f"{text}: no file matches this pattern")
                out.extend(Path(m) for m in matches)
            else:
                out.append(local)
        elif glob.has_magic(text.split("://", 1)[-1]):
            fs, path = _filesystem(text)
            found = sorted(fs.glob(path))
            if not found:
                raise InputError(f"{text}: no file matches this pattern")
            out.extend(fs.unstrip_protocol(p) for p in found)
        else:
            out.append(text)
    if not out:
        raise InputError("no trace file given")
    return out


def portable(location: Location) -> str:
    """The form another process or machine opens: an absolute path (on a filesystem every worker shares) or
    the URL."""
    return os.path.abspath(location) if isinstance(location, Path) else location


def open_binary(url: str) -> IO[bytes]:
    """A seekable binary file object for a remote URL (the caller closes it)."""
    fs, path = _filesystem(url)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{url}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{url}: cannot open ({_first_line(exc)})") from None


def check_remote_file(url: str) -> None:
    """InputError unless the URL names an existing file (not a directory)."""
    fs, path = _filesystem(url)
    try:
        if fs.isdir(path):
            raise InputError(f"{url}: is a directory, not a trace file")
        if not fs.exists(path):
            raise InputError(f"{url}: no such file")
    except (OSError, ValueError) as exc:
        raise InputError(f"{url}: cannot reach ({_first_line(exc)})") from None


def size(location: Location) -> int:
    """Bytes in the file."""
    if isinstance(location, Path):
        return location.stat().st_size
    fs, path = _filesystem(location)
    return int(fs.size(path))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
