"""What a run or benchmark records about the code that made it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from eir.train.results import paths_modified


def _git(checkout: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=checkout, check=True, capture_output=True
    )


def test_paths_modified_tells_an_edited_tree_from_its_commit(tmp_path: Path) -> None:
    assert paths_modified(tmp_path, ["pkg"]) is None, "not a git checkout"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("notes\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "first")
    assert paths_modified(tmp_path, ["pkg", "launch.py"]) is False
    (tmp_path / "notes.md").write_text("edited\n")
    assert paths_modified(tmp_path, ["pkg", "launch.py"]) is False, "only the named paths count"
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert paths_modified(tmp_path, ["pkg", "launch.py"]) is True
