"""The one exception type the CLI turns into a one-line message and exit code 2, and the one reader of JSON
inputs that raises it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class InputError(Exception):
    """Bad user input: a missing or corrupt file, inconsistent shards, an impossible layout.

    The message names the file or option and the problem, in one line, without a traceback.
    """


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The JSON document in `path`; else an InputError naming the file ("no such file" or "not <what>")."""
    p = Path(path)
    try:
        return json.loads(p.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, not {what}") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: not {what} ({str(exc)[:120]})") from exc
