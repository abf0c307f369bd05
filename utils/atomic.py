"""Atomic writes: a reader sees the old file or folder or the complete new one, never a half-written one.

Both get the permissions a plainly created file or folder would get (the process umask): `tempfile`'s 0600 / 0700
would hide outputs from the user's group.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block succeeds it replaces `out` (an existing `out` is
    moved aside first, then deleted); when the block raises, the temporary folder is removed and `out` is untouched.
    Files written in the block get the umask permissions too (safetensors' `save_file` writes 0600)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    mask = _umask()
    tmp.chmod(0o777 & ~mask)
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(0o666 & ~mask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file beside it, synced, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
