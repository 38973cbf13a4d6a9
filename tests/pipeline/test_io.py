"""Atomic writes: whole files or nothing, with the permissions a plain write would give."""
from __future__ import annotations

import os
import stat

import pytest

from pipeline.io import (OWNER_MARK, atomic_torch_save, atomic_write_bytes, atomic_write_text, replace_dir,
                         why_not_replaceable)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_files_and_folders_get_the_modes_of_a_plain_write(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_torch_save(tmp_path / "w.pt", {"a": 1})
    replace_dir(tmp_path / "figures", lambda folder: (folder / "f.png").write_bytes(b"png"), kind="figures")
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    # what open() and mkdir() give (0644 / 0755 under umask 022), not mkstemp's 0600 nor mkdtemp's 0700
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "w.pt") == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "figures") == mode(tmp_path / "plain")
    assert mode(tmp_path / "a.txt") == 0o666 & ~current_umask()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, 12)  # not bytes: fails inside the write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


# ── replace_dir replaces only folders it made ────────────────────────────────
def _fill(folder):
    (folder / "a.txt").write_text("new")


def test_replace_dir_replaces_its_own_folder_and_an_empty_one(tmp_path):
    (tmp_path / "empty").mkdir()
    replace_dir(tmp_path / "empty", _fill, kind="k")  # an empty folder holds nothing to lose
    replace_dir(tmp_path / "empty", lambda f: (f / "b.txt").write_text("again"), kind="k")  # its own: replaced
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [OWNER_MARK, "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temporary or old folder left beside it


@pytest.mark.parametrize("make, words", [
    (lambda t: (t.mkdir(), (t / "mine.csv").write_text("x")), "no .archlab-made.json mark"),
    (lambda t: t.write_text("a file"), "is a file"),
    (lambda t: t.symlink_to(t.parent), "symbolic link"),
    (lambda t: (replace_dir(t, _fill, kind="other"),), "made as a other, not a k"),
    (lambda t: (replace_dir(t, _fill, kind="k"), (t / "notes.txt").write_text("mine")), "notes.txt"),
])
def test_replace_dir_refuses_what_it_cannot_prove_it_made_and_touches_nothing(tmp_path, make, words):
    target = tmp_path / "target"
    make(target)
    before = {p: (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")}
    assert words in why_not_replaceable(target, "k")
    with pytest.raises(FileExistsError, match="target"):
        replace_dir(target, _fill, kind="k")
    assert {p: (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")} == before
