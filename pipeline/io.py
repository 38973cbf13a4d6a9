"""Atomic file writes: a temporary file in the same folder, then os.replace. Readers never see half a file."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _default_modes() -> tuple[int, int]:
    """The modes open() and mkdir() would give under this process's umask (mkstemp/mkdtemp give 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


FILE_MODE, DIR_MODE = _default_modes()


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file beside `path`: moved onto it if the block succeeds, removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)  # reports and runs are read by others (a web server, a colleague)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC and err.filename is None:  # a failed write names no file: name the target
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _replacing(Path(path)) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def atomic_torch_save(path: str | Path, obj) -> None:
    """torch.save, atomically. Serialised in memory first: torch's own file writer reports a full disk as
    "unexpected pos ..."; Python's write says ENOSPC, which the CLI turns into one clear line."""
    import io

    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ── folders archlab made, and only those, may be replaced ────────────────────
OWNER_MARK = ".archlab-made.json"  # written into every folder replace_dir builds: the proof archlab made it


def _entries(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def why_not_replaceable(target: str | Path, kind: str) -> str | None:
    """Why archlab may not replace `target` with a new folder of this `kind`, or None if it may.

    It may when nothing is there, when an empty folder is (nothing to lose), or when a folder carries
    archlab's mark for the same kind and holds nothing beyond the entries the mark lists.
    """
    target = Path(target)
    if target.is_symlink():
        return "is a symbolic link; archlab replaces only folders it made itself"
    if not target.exists():
        return None
    if not target.is_dir():
        return "is a file, not a folder archlab made; archlab replaces only folders it made itself"
    entries = _entries(target)
    if not entries:
        return None
    try:
        mark = json.loads((target / OWNER_MARK).read_text())
        made_by, made_kind, listed = mark["made_by"], mark["kind"], set(mark["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return (f"holds files archlab did not make (no {OWNER_MARK} mark); move it away or choose another "
                "path: archlab replaces only folders it made itself")
    if made_by != "archlab" or made_kind != kind:
        return f"was made as a {made_kind}, not a {kind}; move it away or choose another path"
    foreign = [e for e in entries if e != OWNER_MARK and e not in listed]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"holds files archlab did not put there ({shown}); move them away first"
    return None


def replace_dir(target: str | Path, fill: Callable[[Path], None], kind: str) -> None:
    """Build a folder beside `target` with `fill`, mark it as archlab's, then swap it in; on failure the old
    folder stays. Refuses (FileExistsError) a target archlab cannot prove it made: callers check first with
    why_not_replaceable to tell the user, this is the last guard."""
    target = Path(target)
    reason = why_not_replaceable(target, kind)
    if reason is not None:
        raise FileExistsError(f"{target}: {reason}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        os.chmod(tmp, DIR_MODE)
        fill(tmp)
        atomic_write_json(tmp / OWNER_MARK, {"made_by": "archlab", "kind": kind, "entries": _entries(tmp)})
        old = None
        if target.exists():
            # A fresh empty name (rename may replace an empty folder): never a path someone else owns.
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
