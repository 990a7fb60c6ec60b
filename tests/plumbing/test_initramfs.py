"""``dynamic_binary``: a dynamic program with its libraries as initramfs entries, folders first."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifeboat.plumbing.errors import LifeboatError
from lifeboat.plumbing.initramfs import dynamic_binary


def test_a_dynamic_binary_comes_with_its_libraries_and_their_folders_first(tmp_path: Path) -> None:
    entries = dynamic_binary(Path("/usr/sbin/dmsetup"))
    names = [name for name, _, _ in entries]
    folders = [name for name, mode, _ in entries if mode == 0o040755]
    assert names[: len(folders)] == folders and {"bin", "lib64", "lib/x86_64-linux-gnu"} <= set(folders)
    assert "bin/dmsetup" in names and "lib64/ld-linux-x86-64.so.2" in names
    assert any(n.startswith("lib/x86_64-linux-gnu/libdevmapper.so") for n in names)
    data = dict((name, body) for name, _, body in entries)
    assert data["bin/dmsetup"] == Path("/usr/sbin/dmsetup").read_bytes()
    assert data["lib64/ld-linux-x86-64.so.2"][:4] == b"\x7fELF"  # the file, not the symlink
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(LifeboatError, match="ldd"):
        dynamic_binary(script)
