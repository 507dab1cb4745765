"""Writing files safely: atomic writes that honour the umask, our stale temporaries, locks.

- :func:`atomic_write` (:func:`atomic_write_text`): a temp file in the target's folder, filled
  by the caller's writer and renamed into place; the result
  has the mode a plain ``open()`` would give (0644 under the usual umask 022), not mkstemp's 0600.
- :func:`temp_dir`: a temporary folder ``.NAME.tmp-<pid>-XXXX`` next to ``NAME`` (mode 0755
  under umask 022); :func:`clean_stale_temps` removes those whose process is gone (a killed
  export), never another live process's.
- :func:`exclusive`: an advisory lock ``.NAME.lock`` held while ``NAME`` is written, so two
  processes never write one output at once (the second gets an MpqError).
- :func:`normalize_modes`: what a writer created 0600 (safetensors does) gets the umask's mode.
- :func:`check_writable`: refuse an output path that cannot be written before any work starts.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mpq.errors import MpqError


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temp file in ``path``'s folder, which is then renamed to ``path``
    (mode 0666 minus the umask, like ``open``). An unwritable place is an MpqError; a failed
    write leaves nothing behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise MpqError(
            f"cannot write {str(path)!r}: {exc.strerror or exc}; choose a writable path"
        ) from None
    try:
        os.close(fd)
        write(Path(tmp))
        # after the writer: some (safetensors) replace the file and create it 0600 again
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_writable(path: Path, what: str) -> None:
    """MpqError unless a file can be created at ``path`` (its nearest existing ancestor is a
    writable folder and ``path`` is not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise MpqError(f"{what} {str(path)!r} is a folder; give the path of the file to write")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MpqError(
            f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder; "
            f"choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MpqError(
            f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not writable; choose "
            f"a writable path"
        )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _stale_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-(\d+)(?:-.*)?$")


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-<pid>-*`` / ``.NAME.old-<pid>`` next to ``out`` whose pid is dead
    (left by a killed run); returns what was removed."""
    out = Path(out)
    pattern = _stale_pattern(out.name)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def temp_dir(out: Path) -> Path:
    """A new ``.NAME.tmp-<pid>-XXXX`` folder next to ``out`` with the umask's mode."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def normalize_modes(folder: Path) -> None:
    """Give ``folder`` and everything under it the modes ``open``/``mkdir`` would under the
    current umask (some writers, e.g. safetensors, create files 0600)."""
    mask = current_umask()
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def exclusive(out: Path, what: str = "--out") -> Iterator[None]:
    """Hold the advisory lock ``.NAME.lock`` next to ``out``; MpqError when another process
    holds it. The lock file is removed on release."""
    import fcntl

    out = Path(out)
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise MpqError(
                    f"another mpq process is writing {what} {str(out)!r} right now; wait for it "
                    f"to finish or choose another {what}"
                ) from None
            raise
        try:  # the file we locked must still be the lock (not one unlinked by a releaser)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
