"""Files, one place each: atomic writes, JSONL, checkpoint listing and checks, name slugs.
(Device and autocast: lsp.models.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from lsp.errors import InputError

_UMASK = os.umask(0o022)  # the process umask (read by setting it, then restored)
os.umask(_UMASK)
CHECKPOINT_MARKER = "lsp_checkpoint.json"  # written last: a folder without it is not a checkpoint


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


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a last line cut short by a killed writer is dropped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:-1] if line.strip()]
    with contextlib.suppress(json.JSONDecodeError):  # torn by a kill: that record is incomplete
        rows += [json.loads(lines[-1])] if lines and lines[-1].strip() else []
    return rows


def slug(text: str, max_len: int = 80) -> str:
    """A file- and MLflow-safe name: `embedded:smollm2-135m-instruct` -> `embedded_smollm2-135m-instruct`."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return out[-max_len:] or "model"


def list_checkpoints(dirpath: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(dirpath)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / CHECKPOINT_MARKER).exists()]
    return sorted(done, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    try:
        return int(json.loads((path / CHECKPOINT_MARKER).read_text())["step"])
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(f"{path / CHECKPOINT_MARKER}: corrupt marker ({err!r}); delete "
                                     f"{path} to use the other checkpoints") from None


class CheckpointWriteError(InputError):
    """A checkpoint could not be written (disk full, folder not writable)."""


class CorruptCheckpointError(InputError):
    """A checkpoint folder whose marker says complete but whose files do not read back."""


def check_checkpoint(path: Path) -> None:
    """Cheap integrity checks before resuming: every weight file's safetensors header covers the
    file, and the trainer state's zip directory (at the file's end) is there. A truncated or
    overwritten file fails here, naming itself, instead of deep inside a load."""
    import zipfile

    from safetensors import safe_open

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CorruptCheckpointError(f"{path}: no *.safetensors weights in the checkpoint")
    for file in weights:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # SafetensorError (truncated, not a safetensors file), OSError
            raise CorruptCheckpointError(f"{file}: corrupt ({err})") from None
    state = path / "trainer_state.ckpt"
    try:
        zipfile.ZipFile(state).close()
    except (OSError, zipfile.BadZipFile) as err:
        raise CorruptCheckpointError(f"{state}: corrupt or missing ({err})") from None


def latest_checkpoint(dirpath: str | Path) -> Path | None:
    found = list_checkpoints(dirpath)
    return found[-1] if found else None
