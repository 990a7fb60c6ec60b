"""Initramfs building blocks: a newc cpio writer, a resolver of Linux kernel modules with their
dependencies (read from each module's ``.modinfo``) and dynamic programs with their shared
libraries (``dynamic_binary``), for the small busybox initramfs files that
lifeboat builds itself (the sample guest's, ``examples/sample_guest.py``; the bare-metal recovery
environment's, ``targets/pxeenv.py``), without depending on initramfs-tools on the host."""

from __future__ import annotations

import gzip
import lzma
import re
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

from lifeboat.plumbing.errors import LifeboatError

BUSYBOX = Path("/bin/busybox")


class NoStaticBusybox(LifeboatError):
    """The static busybox that every initramfs here is made of is not installed."""


def _elf_sections(data: bytes) -> dict[str, bytes]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        headers.append((name, offset, size))
    str_off, str_size = headers[shstrndx][1], headers[shstrndx][2]
    strtab = data[str_off : str_off + str_size]
    sections = {}
    for name, offset, size in headers:
        sname = strtab[name : strtab.index(b"\0", name)].decode()
        sections[sname] = data[offset : offset + size]
    return sections


def is_static_elf(path: Path) -> bool:
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != pt_interp for i in range(phnum))


def _module_bytes(path: Path) -> bytes:
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    return path.read_bytes()


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _module_depends(ko: bytes) -> list[str]:
    modinfo = _elf_sections(ko).get(".modinfo", b"")
    for item in modinfo.split(b"\0"):
        if item.startswith(b"depends="):
            return [d.replace("-", "_") for d in item[len(b"depends=") :].decode().split(",") if d]
    return []


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """The modules (name, uncompressed .ko) needed for ``wanted``, dependencies first.

    Modules built into the kernel (modules.builtin) are left out.
    """
    index: dict[str, Path] = {}
    for p in sorted((moddir / "kernel").rglob("*.ko*")):
        if re.search(r"\.ko(\.xz|\.gz|\.zst)?$", p.name):
            index.setdefault(_module_name(p), p)
    builtin: set[str] = set()
    if (moddir / "modules.builtin").exists():
        for line in (moddir / "modules.builtin").read_text().split():
            builtin.add(_module_name(Path(line)))
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name in chain:
            raise RuntimeError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            raise RuntimeError(f"kernel module {name} not found under {moddir}")
        ko = _module_bytes(index[name])
        for dep in _module_depends(ko):
            visit(dep, chain + (name,))
        done.add(name)
        order.append((name, ko))

    for name in wanted:
        visit(name, ())
    return order


def cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc (``cpio -H newc``) archive; entries are (name, mode, data, (rdev major, minor))."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        namez = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(namez)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(ino, name, mode, data, rdev)
    add(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def busybox_initramfs(
    init: str, modules: list[tuple[str, bytes]], files: Iterable[tuple[str, int, bytes]] = ()
) -> bytes:
    """A gzip-compressed initramfs: static busybox as ``/bin/sh``, ``modules`` as
    ``/lib/modules/NAME.ko``, ``init`` (its ``@MODULES@`` replaced by the module names, in load
    order) and extra ``files`` (path, mode, bytes). Reproducible: the same inputs give the same bytes."""
    if not BUSYBOX.exists() or not is_static_elf(BUSYBOX):
        raise NoStaticBusybox(f"{BUSYBOX} is missing or not static: install busybox-static")
    d, f, x = 0o040755, 0o100644, 0o100755
    init = init.replace("@MODULES@", " ".join(name for name, _ in modules))
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (name, d, b"", (0, 0)) for name in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules")
    ]
    entries += [
        ("dev/console", 0o020600, b"", (5, 1)),
        ("bin/busybox", x, BUSYBOX.read_bytes(), (0, 0)),
        ("bin/sh", 0o120777, b"busybox", (0, 0)),
        ("init", x, init.encode(), (0, 0)),
    ]
    entries += [(path, mode, data, (0, 0)) for path, mode, data in files]
    entries += [(f"lib/modules/{name}.ko", f, ko, (0, 0)) for name, ko in modules]
    return gzip.compress(cpio_newc(entries), compresslevel=9, mtime=0)


def dynamic_binary(path: Path, dest: str = "bin") -> list[tuple[str, int, bytes]]:
    """A dynamically linked program and the shared libraries it loads (``ldd``), as initramfs
    ``files`` entries: the program at ``DEST/NAME``, each library and the ELF interpreter at the
    path it has on this host (``/lib/x86_64-linux-gnu/...``, ``/lib64/ld-linux-x86-64.so.2``), and
    the folders they need first (the kernel's unpacker does not create missing parents). For
    Debian's ``nbd-client`` and ``dmsetup`` in a netboot initramfs, which busybox cannot replace."""
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LifeboatError(f"ldd {path}: {done.stderr.strip() or done.stdout.strip()}")
    libs: list[str] = []
    for line in done.stdout.splitlines():
        m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    files = [(f"{dest}/{path.name}", 0o100755, path.read_bytes())]
    files += [(lib.lstrip("/"), 0o100755, Path(lib).resolve().read_bytes()) for lib in libs]
    folders = sorted({str(Path(name).parent) for name, _, _ in files} - {"."})
    parents = sorted({str(p) for f in folders for p in [Path(f), *Path(f).parents] if str(p) != "."})
    return [(d, 0o040755, b"") for d in parents] + files
