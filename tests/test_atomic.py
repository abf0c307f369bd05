"""utils/atomic.py: all or nothing, and the permissions of a plainly created file or folder."""

import os
import stat

import pytest

from utils.atomic import atomic_folder, write_text_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_folder_and_file_get_the_umask_permissions(tmp_path, umask_027):
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.safetensors").write_bytes(b"x")
        (tmp / "sub" / "w.safetensors").chmod(0o600)  # as safetensors' save_file leaves its files
    write_text_atomic(tmp_path / "b.json", "{}")
    assert mode(tmp_path / "out") == 0o750  # tempfile alone would give 0700
    assert mode(tmp_path / "out" / "a.txt") == mode(tmp_path / "out" / "sub" / "w.safetensors") == 0o640
    assert mode(tmp_path / "b.json") == 0o640  # and 0600
    assert (tmp_path / "b.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "out"]


def test_failed_writes_leave_the_old_content_and_no_temporaries(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("crash")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]

    write_text_atomic(tmp_path / "f.txt", "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "f.txt", "new")
    assert (tmp_path / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "out"]
