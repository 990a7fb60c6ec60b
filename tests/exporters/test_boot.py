"""The sample guest, backed up into an archive and exported, boots under QEMU from the qcow2,
VMDK (both kinds) and VHDX images, and its disk write lands (``disk-write-ok``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples import sample_guest as sg
from lifeboat.archive import Archive, PointReader
from lifeboat.exporters import EXPORTERS, open_image


@pytest.fixture(scope="module")
def guest_point(sample_guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> PointReader:
    arc = Archive.init(str(tmp_path_factory.mktemp("boot") / "arc"))
    with open_image(sample_guest_image) as src:
        info = arc.backup("guest", src)
    return arc.reader(info)


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vmdk-stream", "vhdx"])
def test_exported_guest_boots(fmt: str, guest_point: PointReader, tmp_path: Path) -> None:
    image = tmp_path / f"guest.{fmt}"
    EXPORTERS.get(fmt)().write(guest_point, image)
    # qemu writes a streamOptimized VMDK only front to back: boot it with a throwaway overlay
    extra = ["-snapshot"] if fmt == "vmdk-stream" else []
    result = sg.boot(str(image), fmt=EXPORTERS.get(fmt).qemu_format, extra_args=extra)
    assert result.matched, f"console:\n{result.console[-3000:]}\nstderr:\n{result.stderr}"
    assert "LIFEBOAT-GUEST: booted" in result.lines
    if not extra:  # the guest's write went into the exported image itself
        with open_image(image) as src:
            counter, _ = sg.read_record(src.read(sg.PARTITION2_OFFSET, 512))
        assert counter == sg.INITIAL_COUNTER + 1
