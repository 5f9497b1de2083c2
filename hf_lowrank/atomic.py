"""Writing a folder's files all or nothing, one writer at a time.

    lock the folder (flock on the folder itself: concurrent saves queue, none fails)
      └─ remove what a killed save left (.hf_lowrank-save-*), write every file into a fresh one, fsync each
         └─ rename each over its target (microseconds), fsync the folder, unlock

A kill while writing (the slow part) leaves the old files untouched. A kill between two renames leaves files of two
saves side by side; adapter folders record a checksum of their config in the weights' header, so such a mix is
refused on load (`hf_lowrank.state`) rather than silently combined, and the next save replaces it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_PREFIX = ".hf_lowrank-save-"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (POSIX flock on the directory itself; nothing is added to it)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; saves are still atomic per file
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_flushed(path: Path, write: Callable[[str], None]) -> None:
    """`write(path)`, then flush the file to disk."""
    write(str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_files(folder: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Write every file of `writers` (name → function writing that path) into `folder`, all or nothing per file,
    under the folder's lock; see the module docstring for what a crash can leave."""
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        for stale in folder.glob(TEMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=TEMP_PREFIX))
        try:
            for name, write in writers.items():
                _write_flushed(tmp / name, write)
            for name in writers:
                os.replace(tmp / name, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder)


def interrupted_save(folder: Path) -> bool:
    """Whether a save into `folder` was killed (its temporary folder is still there)."""
    return any(folder.glob(TEMP_PREFIX + "*"))


def replace_folder(output: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Build a whole folder in a temporary sibling with `fill(tmp)`, then move it to `output` in one rename.

    A failure or a kill inside `fill` leaves `output` as it was (only a hidden `.<name>.*` sibling to remove). An
    existing `output` is refused unless `overwrite`; then it is swapped out and deleted once the new one is in place.
    """
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} is a file, not a folder")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} already exists and is not empty; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        fill(tmp)
        old = None
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, old / output.name)
        os.replace(tmp, output)
        fsync_dir(output.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
