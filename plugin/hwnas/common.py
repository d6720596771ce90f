"""Shared plumbing: the project error, the cache folder, atomic writes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
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


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise HwnasError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HwnasError(f"{what} {path} is not valid JSON: {e}") from None


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
