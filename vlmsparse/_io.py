"""File helpers shared by every module that writes files: nothing is left half-written, and what is written gets
the modes a plain ``open()`` / ``mkdir`` would give (``0o666 & ~umask`` / ``0o777 & ~umask``), not the private
``0o600`` / ``0o700`` of ``mkstemp`` / ``mkdtemp`` and of safetensors >= 0.8.

- :func:`atomic_write`: one file, written as a temporary sibling and renamed onto its path.
- :func:`write_folder_atomically`: one folder, filled as a temporary sibling and renamed onto its path.
- :func:`follow_umask`: give a folder (or just some paths in it) the modes ``mkdir`` / ``open()`` give.
- :func:`file_identities`: ``{file: (device, inode)}`` under a folder, to tell which files a save created.
- :func:`current_umask`: the process umask, read without changing it where the OS allows.

The lowest layer of the package (standard library only); see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

__all__ = ["atomic_write", "write_folder_atomically", "follow_umask", "file_identities", "current_umask"]

T = TypeVar("T")


def current_umask() -> int:
    """The process umask (read from ``/proc/self/status`` where there is one, so it is never changed; else
    set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` to write a temporary file beside ``path``, then rename it onto ``path``,
    so that ``path`` is never left half-written. The file gets mode ``0o666 & ~umask``, as with ``open()``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def follow_umask(folder: str | os.PathLike, only: Collection[str | os.PathLike] | None = None) -> None:
    """Give ``folder``, its subfolders and files the modes a fresh ``mkdir`` / ``open()`` would:
    ``0o777 & ~umask`` / ``0o666 & ~umask`` (links left). With ``only``, just those paths (files or folders)."""
    umask = current_umask()
    if only is not None:
        for path in only:
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
        return
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for names, mode in ((dirs, 0o777), (files, 0o666)):
            for name in names:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, mode & ~umask)


def file_identities(folder: str | os.PathLike) -> dict[Path, tuple[int, int]]:
    """``{file: (device, inode)}`` of every file under ``folder`` (empty if it does not exist); compare two
    calls to find the files created or replaced in between."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            stat = path.lstat()
            out[path] = (stat.st_dev, stat.st_ino)
    return out


def write_folder_atomically(out: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` to fill a new temporary sibling folder of ``out``, then rename it onto ``out``
    (replacing what is there: check with :func:`vlmsparse.pipeline.guards.check_output_folder` first). Returns what
    ``write`` returns.

    Before the rename every folder in it gets mode ``0o777 & ~umask`` and every file ``0o666 & ~umask``, as
    ``mkdir`` / ``open()`` give, not the private ``0o700`` / ``0o600`` of ``mkdtemp`` and of safetensors >= 0.8
    (which ``save_pretrained`` writes through). On an error the temporary folder is removed and an existing
    ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        result = write(tmp)
        follow_umask(tmp)
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return result
