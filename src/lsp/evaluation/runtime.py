"""Small shared helpers: atomic file writes, name slugs (device and autocast: lsp.models)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # the process umask (read by setting it, then restored)
os.umask(_UMASK)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a reader
    (or a restart after a crash) sees either the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def slug(text: str, max_len: int = 80) -> str:
    """A file- and MLflow-safe name: `embedded:smollm2-135m-instruct` -> `embedded_smollm2-135m-instruct`."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return out[-max_len:] or "model"
