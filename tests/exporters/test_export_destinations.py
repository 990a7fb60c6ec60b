"""An export never replaces what is not a regular file: no format streams, so a character device,
FIFO or link is refused (exit 2, naming what it is), with ``--force`` as without."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lifeboat.archive.errors import DestinationError
from lifeboat.exporters.base import atomic_output


@pytest.mark.parametrize("overwrite", [False, True])
def test_special_files_are_refused_and_kept(tmp_path: Path, overwrite: bool) -> None:
    null, fifo, link = tmp_path / "null", tmp_path / "fifo", tmp_path / "link"
    os.mknod(null, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # our own node with /dev/null's numbers
    os.mkfifo(fifo)
    (tmp_path / "file").write_bytes(b"keep")
    link.symlink_to(tmp_path / "file")
    for path, kind in [(null, "character device"), (fifo, "FIFO"), (link, "symbolic link")]:
        with pytest.raises(DestinationError, match=f"{path} is a {kind}") as err:
            with atomic_output(path, overwrite=overwrite):
                pass
        assert err.value.exit_code == 2
    assert stat.S_ISCHR(os.lstat(null).st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "file", "link", "null"]
