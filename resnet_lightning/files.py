"""Files written whole: through a temporary name beside the target, then renamed into place,
so a killed run never leaves a half-written one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: Path | str, content: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)
    return path


def write_json(path: Path | str, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")
