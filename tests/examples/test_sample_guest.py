"""The sample guest really boots under QEMU and its writes land on its disk."""

from pathlib import Path

import pytest

from examples import sample_guest as sg


def test_build_is_cached_and_well_formed(sample_guest_image: Path) -> None:
    before = sample_guest_image.stat()
    again = sg.build()
    assert again == sample_guest_image
    assert again.stat().st_mtime_ns == before.st_mtime_ns  # not rebuilt
    assert before.st_size == 256 * 1024 * 1024

    with open(sample_guest_image, "rb") as f:
        mbr = f.read(512)
        f.seek(sg.PARTITION1_START_SECTOR * 512)
        boot_sector = f.read(512)
    assert mbr[510:512] == b"\x55\xaa"
    assert mbr[:440] == sg.MBR_CODE.read_bytes()[:440]
    part1 = mbr[446:462]
    assert part1[0] == 0x80 and part1[4] == 0x06  # bootable, FAT16
    assert b"FAT16" in boot_sector and b"SYSLINUX" in boot_sector
    assert sg.data_offset(sample_guest_image) == sg.PARTITION2_OFFSET
    assert sg.read_record(sample_guest_image) == (0, "sample-guest")


def test_build_into_fresh_dir_leaves_no_temporaries(tmp_path: Path) -> None:
    image = sg.build(tmp_path)
    assert image.parent == tmp_path
    assert sg.read_record(image) == (0, "sample-guest")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    # A stale temporary from a killed builder is cleaned up by the next build that takes the lock.
    (tmp_path / ".tmp-dead").mkdir()
    sg.write_record(image, 5, "tampered")  # a changed cached image is rebuilt
    rebuilt = sg.build(tmp_path)
    assert rebuilt == image
    assert sg.read_record(rebuilt) == (0, "sample-guest")
    assert not (tmp_path / ".tmp-dead").exists()


def test_record_helpers(sample_guest_image: Path, tmp_path: Path) -> None:
    disk = sg.copy_image(sample_guest_image, tmp_path / "disk.img")
    assert disk.stat().st_size == sample_guest_image.stat().st_size
    assert disk.stat().st_blocks * 512 < 64 * 1024 * 1024  # the copy stays sparse
    sg.write_record(disk, 41, "two  spaces kept")
    assert sg.read_record(disk) == (41, "two  spaces kept")
    data = disk.read_bytes()
    assert sg.read_record(data) == (41, "two  spaces kept")
    block = data[sg.PARTITION2_OFFSET : sg.PARTITION2_OFFSET + 512]
    assert block == b"LBGUEST 41 two  spaces kept\n".ljust(512, b"\0")
    assert sg.read_record(block) == (41, "two  spaces kept")
    with pytest.raises(ValueError):
        sg.write_record(disk, 1, "two\nlines")
    with pytest.raises(ValueError):
        sg.write_record(disk, 1, "x" * 600)
    with pytest.raises(ValueError):
        sg.read_record(bytes(512))


def test_guest_boots_and_counts_up(sample_guest_image: Path, tmp_path: Path) -> None:
    disk = sg.copy_image(sample_guest_image, tmp_path / "disk.img")

    first = sg.boot(str(disk), timeout=90)
    assert first.matched, first.console + first.stderr
    assert first.lines == [
        "LIFEBOAT-GUEST: booted",
        "LIFEBOAT-GUEST: disk-record 0 sample-guest",
        "LIFEBOAT-GUEST: disk-write-ok 1",
    ], first.console
    assert first.exit_status == 0, first.console + first.stderr  # the guest powered off by itself
    booted = first.seconds_to("booted")
    written = first.seconds_to("disk-write-ok")
    assert booted is not None and written is not None and 0 < booted <= written < 90
    assert sg.read_record(disk) == (1, "sample-guest")

    second = sg.boot(str(disk), timeout=90)
    assert second.matched, second.console + second.stderr
    assert "LIFEBOAT-GUEST: disk-record 1 sample-guest" in second.lines
    assert "LIFEBOAT-GUEST: disk-write-ok 2" in second.lines
    assert sg.read_record(disk) == (2, "sample-guest")

    assert sg.read_record(sample_guest_image) == (0, "sample-guest")  # the cached image is untouched


def test_stay_mode_keeps_guest_alive_and_boot_kills_it(sample_guest_image: Path, tmp_path: Path) -> None:
    disk = sg.copy_image(sample_guest_image, tmp_path / "disk.img")
    sg.set_kernel_args(disk, "lifeboat.stay=1")
    result = sg.boot(str(disk), expect="LIFEBOAT-GUEST: alive", timeout=90, linger=0)
    assert result.matched, result.console + result.stderr
    assert "LIFEBOAT-GUEST: disk-write-ok 1" in result.lines
    assert result.exit_status is None  # still running when boot() returned, so it was killed
    assert sg.read_record(disk) == (1, "sample-guest")


def test_boot_gives_up_at_timeout(sample_guest_image: Path, tmp_path: Path) -> None:
    disk = sg.copy_image(sample_guest_image, tmp_path / "disk.img")
    result = sg.boot(str(disk), expect="never printed", timeout=1.0)
    assert not result.matched and result.timed_out
    assert result.exit_status is None
    assert result.elapsed < 10
