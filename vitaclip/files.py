"""Writing files so that readers see the old file or the new one, never a part."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Callable, Iterator, Union


def atomic_write(path: Union[str, Path], write: Callable[[str], object], what: str = "") -> None:
    """write(temporary path) in the same folder, then rename: never half a file, not even after a
    power cut (the data reaches the disk before the rename); concurrent writers (DDP ranks) each
    use their own temporary file. A failed write (a full disk, a quota), which names no file, is
    raised naming `path` (described as `what`, e.g. "checkpoint")."""
    path = Path(path)
    tmp = create_beside(path)
    try:
        try:
            mode = os.stat(tmp).st_mode & 0o777
            write(tmp)
            os.chmod(tmp, mode)  # a writer that replaces the file (safetensors) makes it 0600
            # (NFS and Lustre cache writes: a full disk or a quota may only be reported by its fsync)
            publish(tmp, path)
        except OSError as err:
            if err.errno is None or err.filename is not None:
                raise
            raise OSError(err.errno, f"{err.strerror or os.strerror(err.errno)}: writing "
                                     f"{what + ' ' if what else ''}{path}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_beside(path: Path) -> str:
    """A new empty file .<name>.<8 random characters> beside `path`, created as a plain open() creates
    files: its permissions follow the umask, or the folder's default ACL where it has one (which a
    file created 0600 by mkstemp and then chmod-ed lost, e.g. a shared project folder's group access;
    reading the umask also set it to 0 process-wide for a moment, under other threads' files)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:  # another writer's (O_EXCL: never a file or link already there)
            continue


def remove_unfinished_writes(path: Union[str, Path]) -> None:
    """Delete the temporary files atomic_write left for `path` when it was killed midway (SIGKILL,
    a lost node): each a whole copy of the file, gigabytes for a model's weights."""
    path = Path(path)
    unfinished = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            if unfinished.fullmatch(candidate.name):
                candidate.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: Union[str, Path], metadata: dict) -> None:
    """safetensors' save_file through atomic_write; its failed writes come as a SafetensorError that
    only quotes the system's error ("... (os error 28)"): raised as that OSError, naming `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as err:
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from err

    atomic_write(path, write)


def publish(tmp: Union[str, Path], path: Union[str, Path]) -> None:
    """Rename the written file `tmp` to `path` so that a power cut leaves the old file or the whole
    new one: its data reaches the disk before the rename, the rename before this returns."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)


def fsync_folder(path: Union[str, Path]) -> None:
    """Make a folder's entries (a rename) reach the disk, where the platform can (POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


def fsync_file(path: Union[str, Path]) -> None:
    """Make a written file's data reach the disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def sole_writer(lock_path: Union[str, Path], refusal: str) -> Iterator[None]:
    """Holds the lock file `lock_path` for the block, or raises ValueError(refusal) where another
    process holds it: two writers of one folder would write the same files at once. Closing the
    file releases the lock, also when the process dies (no stale lock to clear by hand). On a file
    system that cannot lock files (Lustre mounted without flock, some NFS), warns and goes on
    unguarded: refusing would stop every run there."""
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{refusal} (it holds {lock.name})") from None
        except OSError as error:
            if error.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            warnings.warn(f"{lock.name} cannot be locked on this file system ({os.strerror(error.errno)}): a "
                          f"second process writing the same folder would not be refused")
        yield
