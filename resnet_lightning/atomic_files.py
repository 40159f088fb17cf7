"""Files written whole: through a temporary file beside the target, flushed to disk, then
renamed into place, so a killed run never leaves a half-written one."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Content = str | bytes | Callable[[IO[bytes]], None]


def write_atomic(path: Path | str, content: Content, tmp_suffix: str = ".tmp") -> Path:
    """Write `content` (text, bytes, or a function writing to the open file) to `path`.

    The temporary file is `.<name>.<pid><tmp_suffix>`; it is removed when the write fails, and
    by `remove_leftovers` when the process was killed during the write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{tmp_suffix}")
    # O_NOFOLLOW: never write through a link planted in the folder; 0o666 & umask gives the
    # permissions any other file of the run gets.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        with os.fdopen(os.open(tmp, flags, 0o666), "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode() if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left after the rename
    return path


def remove_leftovers(folder: Path | str, tmp_suffix: str = ".tmp") -> None:
    """Delete the temporary files that `write_atomic` calls with `tmp_suffix` left in `folder`:
    writes that a kill (SIGKILL, a crash, power loss) cut short. Only names of that form are
    touched, and not in subfolders."""
    leftover = re.compile(rf"\..+\.\d+{re.escape(tmp_suffix)}")
    for path in Path(folder).glob(f".*{tmp_suffix}"):
        if leftover.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def write_json(path: Path | str, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")
