"""Shared plumbing: the project error, the cache folder, atomic writes, output locks."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

ENV_HOME = "HWNAS_HOME"


class HwnasError(ValueError):
    """Bad input or state, with a message that names the bad value and what was expected."""


def _checkout_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "plugin").is_dir() else None


def home() -> Path:
    """The hwnas cache folder: $HWNAS_HOME, else `.cache/hwnas` in the source checkout, else `./.hwnas`."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser().resolve()
    root = _checkout_root()
    return (root / ".cache" / "hwnas") if root else (Path.cwd() / ".hwnas").resolve()


def point_library_caches() -> None:
    """Keep every library cache inside the hwnas folder unless the user chose otherwise."""
    base = home()
    for var, sub in (
        ("HF_HOME", "huggingface"),
        ("XDG_CACHE_HOME", "xdg"),
        ("MPLCONFIGDIR", "matplotlib"),
        ("TORCHINDUCTOR_CACHE_DIR", "torchinductor"),
    ):
        os.environ.setdefault(var, str(base / sub))
    _keep_openvino_telemetry_inside(base / "openvino")


def _keep_openvino_telemetry_inside(folder: Path) -> None:
    """openvino-telemetry (used by nncf and optimum-intel) writes ~/intel/*; it has no setting, so redirect it."""
    try:
        from openvino_telemetry.utils.opt_in_checker import OptInChecker
    except ImportError:
        return
    folder.mkdir(parents=True, exist_ok=True)
    OptInChecker.consent_file_base_dir = staticmethod(lambda: str(folder))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    """Temporaries beside `path` carry this host and process, so a later run can tell a killed run's leftovers."""
    return f".{path.name}.hwnas-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _apply_umask(folder: Path) -> None:
    """Give what a command wrote the user's umask: some writers (safetensors) create their files 0600."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p) and not os.stat(p).st_mode & 0o111:
                os.chmod(p, 0o666 & ~mask)


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries beside `path` that a killed run on this host left (its process is gone)."""
    path = Path(path)
    return _clean_stale(path.parent, re.escape(f".{path.name}.hwnas-{socket.gethostname()}-"))


def clean_stale_temps_in(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of every name directly in `folder` that a killed run on this host left."""
    return _clean_stale(Path(folder), r"\..+?\.hwnas-" + re.escape(socket.gethostname()) + "-")


def _clean_stale(folder: Path, prefix: str) -> list[Path]:
    if not folder.is_dir():
        return []
    pattern = re.compile(prefix + r"(\d+)-")
    removed = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename (with the user's umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name: renamed onto `path` (with the user's
    umask) when the block ends, removed if it raises. Names starting with it are cleaned as its leftovers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise HwnasError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, integers past Python's digit limit, deep nesting
        raise HwnasError(f"{what} {path} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out` in one rename.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise HwnasError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HwnasError(f"output folder {out} is not empty; pass --overwrite to replace it")
    if out.is_dir() and not os.access(out, os.W_OK):
        raise HwnasError(f"output folder {out} is not writable; expected a folder this user can write")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _apply_umask(tmp)
    old = None
    if out.exists():
        old = out.with_name(_temp_prefix(out) + "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_output(out: str | os.PathLike, *, overwrite: bool, own: bool = False, option: str = "--out") -> Path:
    """Refuse an existing non-empty `out` (file or folder) unless it is the command's own resumable output (`own`)
    or `overwrite` is given; with `overwrite`, the old output is removed first. The temporaries a killed hwnas run
    left directly inside `out` are removed first, so a run killed before its first file was published is no
    reason to refuse."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return out
    if overwrite:
        shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        return out
    if out.is_dir() and not out.is_symlink():  # a folder holding only a killed run's temporaries counts as empty
        clean_stale_temps_in(out)
    if out.is_dir() and (own or not any(out.iterdir())):
        return out
    what = "non-empty folder" if out.is_dir() else "file"
    raise HwnasError(f"{option} {out} is an existing {what}; pass --overwrite to replace it")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path | None]:
    """Hold `.OUT.lock` beside `out` for one run: a second run on the same output is refused; the lock of a
    killed run is released by the OS (flock), so the next run takes it over. None where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, as before
        yield None
        return
    out = Path(out).resolve()
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = lock.read_text(encoding="utf-8", errors="replace").strip() or "another process"
            raise HwnasError(f"{out} is being written by another hwnas run ({holder}); wait for it to finish or "
                             "choose another output") from None
        try:  # the file may have been removed by the run that just released it: lock the one on disk
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        clean_stale_temps(out)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
        for folder in created:  # the folders made for the lock, when the run left nothing in them
            with contextlib.suppress(OSError):
                folder.rmdir()
