"""Files: atomic writes of files and folders, and the sweep of dead runs' temporaries."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from biounet.errors import InputError

log = logging.getLogger(__name__)


PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` on success.

    The temporary file keeps the suffix of ``path`` (so writers that choose the format by
    file name still work) and lives in the same folder (so the final ``os.replace`` is an
    atomic rename on POSIX and Windows). On success the file and then its folder are
    flushed to disk (``fsync``), so a power cut after the call leaves the new file, not an
    empty one. On any exception it is removed and ``path`` is left exactly as it was. A
    temporary file that a killed process (``SIGKILL``) left behind is removed by the next
    write into the same folder (:func:`sweep_stale_temporaries`).

    Examples
    --------
    >>> with atomic_write("out.tif") as tmp:  # doctest: +SKIP
    ...     tifffile.imwrite(tmp, array)
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    sweep_stale_temporaries(folder)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}{_temporary_mark()}", suffix=f".tmp{path.suffix}",
                                        dir=folder)  # fmt: skip
    except OSError as exc:
        raise InputError(f"{path}: cannot write to folder {folder}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that replaces ``path`` on success.

    The folder form of :func:`atomic_write`, for outputs that are folders (Zarr, OME-Zarr,
    a model): on success every file in it is flushed to disk, an existing ``path`` is moved
    aside, the new folder renamed into place and the old one deleted; on any exception the
    temporary folder is removed and ``path`` is left as it was (moved back if the exception
    came between the two renames; a process killed right there leaves the old folder aside,
    and the next sweep of the folder puts it back).
    """
    path = Path(path)
    sweep_stale_temporaries(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_temporary_mark()}", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise InputError(f"{path}: cannot write to folder {path.parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}{_temporary_mark()}{uuid.uuid4().hex}.old")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            tmp.rename(path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_folder(parent: PathLike, stem: str) -> Iterator[Path]:
    """Yield a new hidden folder in ``parent`` for intermediate files; removed with everything in it on exit.

    Named like the temporaries of :func:`atomic_folder`, so that a folder a killed process
    left behind is removed by the next run into ``parent`` (:func:`sweep_stale_temporaries`).
    """
    parent = Path(parent)
    sweep_stale_temporaries(parent)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{stem}{_temporary_mark()}", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise InputError(f"{parent}: cannot write to the folder: {exc.strerror or exc}") from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


#: What marks the temporary files and folders of :func:`atomic_write` and
#: :func:`atomic_folder`: ``.biounet@<host>@<pid>@`` in the name, so that a later run can tell
#: those of a process that died from those of one still writing.
_TEMPORARY = re.compile(r"\.biounet@(?P<host>[^@/\\]+)@(?P<pid>\d+)@.*\.(?P<kind>tmp|old)(\.[^.]*)?$")
#: A temporary is swept only when it has not changed for this long, besides its writer being
#: gone: containers that share a host name but not process ids cannot take each other's.
STALE_AFTER_SECONDS = 15 * 60
_swept: set[Path] = set()


def _temporary_mark() -> str:
    return f".biounet@{socket.gethostname()}@{os.getpid()}@"


def sweep_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporary files and folders that dead processes left in ``folder``.

    Only names that :func:`atomic_write` and :func:`atomic_folder` make are looked at, and
    of them only those of a process of this host that no longer runs (POSIX signal 0 says
    so; nothing is swept on Windows) and that have not changed for
    :data:`STALE_AFTER_SECONDS`. An old folder that :func:`atomic_folder` had moved aside
    is put back if nothing took its place, else removed. Each folder is swept once per
    process. Returns what was removed or put back.
    """
    folder = Path(folder).resolve()
    if folder in _swept or os.name == "nt":
        return []
    _swept.add(folder)
    removed = []
    host, now = socket.gethostname(), time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _TEMPORARY.search(entry.name)
        if not match or match["host"] != host or _alive(int(match["pid"])):
            continue
        try:
            if now - entry.lstat().st_mtime < STALE_AFTER_SECONDS:
                continue
            target = folder / entry.name[1 : match.start()]
            if match["kind"] == "old" and not (target.exists() or target.is_symlink()):
                entry.rename(target)  # killed between the two renames of atomic_folder
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    if removed:
        log.info("%s: removed %d temporary file(s) left by killed runs", folder, len(removed))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or a platform without signal 0
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders only where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on folders
        pass
    finally:
        os.close(fd)


def ensure_writable_folder(path: PathLike, what: str = "output folder") -> Path:
    """Create folder ``path`` if needed and check that files can be written in it.

    Raises one :class:`ValueError` naming the folder (``what`` says which one) otherwise, before
    any work is done.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".biounet-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{folder}: {what} cannot be written: {exc.strerror or exc}") from exc
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
