import os
import stat

import pytest

from atprune.atomic import atomic_file, umask


def test_success_replaces_the_file_with_umask_permissions(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_file(target) as fh:
        fh.write("new ü")
    assert target.read_text(encoding="utf-8") == "new ü"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask()
    assert sorted(os.listdir(tmp_path)) == ["out.json"]  # no temporary file left


def test_error_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(target, "wb") as fh:
            fh.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]


def test_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        with atomic_file(tmp_path / "absent" / "f.txt") as fh:
            fh.write("x")
