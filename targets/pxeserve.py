"""The HTTP side of a bare-metal restore: what a PXE-booting server fetches from lifeboat, and where
its recovery environment reports to (see ``targets/pxeenv.py`` for why HTTP and not NBD).

Run by the pxe driver as its own process (``python -m lifeboat.targets.pxeserve CONFIG TOKEN``, the
token on the command line so that teardown finds it again after a crash), one per server, so it
keeps serving while the orchestrator restarts. ``CONFIG`` (JSON) names the listen address, the
point's raw image, the kernel and initramfs, the iPXE script and the plan; every request that
matters is appended to the events file (JSON lines), which the driver reads in ``poll``:
``netboot`` (the iPXE script was fetched), ``chosen``, ``progress``, ``grown``, ``done``, ``fail``, and in instant
mode ``booting`` (``targets/pxeinstant.py``).

Paths: ``/boot.ipxe``, ``/vmlinuz``, ``/initrd.gz``, ``/plan`` (shell variables), ``/map`` (``data|zero
OFFSET LENGTH`` lines), ``/data?offset=&length=``, ``/tables?disk_bytes=`` (``OFFSET LENGTH`` lines: the
partition tables adapted to the disk, see ``tables``) and ``/table?disk_bytes=&offset=`` (one of them),
``/chosen``, ``/progress?done=``, ``/grown?part=&fs=&bytes=&resized=`` (``targets/pxegrow.py``),
``/done``, ``/fail?reason=``; ``/grow.gz`` (file-system growth's addition to the initramfs); in
instant mode ``/instant.gz`` (its addition) and ``/booting``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lifeboat.targets.gpt import grown_gpt

SECTOR = 512
ALIGN = 1024 * 1024
MAX_EXTENT = 16 * 1024 * 1024  # the recovery environment holds one extent in RAM


def extents(path: Path) -> list[tuple[str, int, int]]:
    """The image as ("data"|"zero", offset, length) runs: data where the file has data (SEEK_DATA),
    rounded out to MiB and cut to at most ``MAX_EXTENT``, zero elsewhere; the first sector is left
    out (written last, from ``/tables``)."""
    size = path.stat().st_size
    runs: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            start, end = start - start % ALIGN, min(size, -(-end // ALIGN) * ALIGN)
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(end, runs[-1][1]))
            else:
                runs.append((start, end))
            pos = end
    finally:
        os.close(fd)
    out: list[tuple[str, int, int]] = []
    pos = SECTOR
    for start, end in runs:
        start = max(start, SECTOR)
        if start > pos:
            out.append(("zero", pos, start - pos))
        while start < end:
            n = min(MAX_EXTENT, end - start)
            out.append(("data", start, n))
            start += n
        pos = max(pos, end)
    if pos < size:
        out.append(("zero", pos, size - pos))
    return out


def last_mbr_partition(sector: bytes, image_bytes: int) -> tuple[int, int, int] | None:
    """(index, start sector, end sector) of the MBR partition that grows onto a larger disk: the one
    that ends last, when it reaches the image's end (less than 1 MiB short of it); None for a GPT
    (protective type 0xee), no partition table, or a last partition that stops short."""
    if len(sector) != SECTOR or sector[510:512] != b"\x55\xaa":
        return None
    entries = [struct.unpack_from("<B3sB3sII", sector, 446 + 16 * i) for i in range(4)]
    if any(e[2] == 0xEE for e in entries):
        return None
    used = [(e[4] + e[5], i) for i, e in enumerate(entries) if e[2] != 0 and e[5] > 0]
    if not used:
        return None
    end, last = max(used)
    if end * SECTOR < image_bytes - ALIGN:
        return None
    return last, entries[last][4], end


def grown_mbr(sector: bytes, image_bytes: int, disk_bytes: int) -> bytes:
    """The MBR ``sector`` for a disk of ``disk_bytes``: its ``last_mbr_partition`` grown to the
    disk's end (keeping the same gap after it). Anything else is left as is."""
    found = last_mbr_partition(sector, image_bytes)
    if found is None or disk_bytes <= image_bytes:
        return sector
    last, start, end = found
    disk_sectors = min(disk_bytes // SECTOR, 2**32 - 1)
    gap = max(0, image_bytes // SECTOR - end)  # keep the same tail after the partition
    out = bytearray(sector)
    struct.pack_into("<I", out, 446 + 16 * last + 12, disk_sectors - gap - start)
    return bytes(out)


def tables(image: Path, disk_bytes: int) -> list[tuple[int, bytes]]:
    """What the environment writes after the extents, in this order (the first sector last): a GPT's
    pieces for a larger disk (``targets/gpt.py``), else the first sector with the last MBR partition
    grown (``grown_mbr``)."""
    size = image.stat().st_size
    with open(image, "rb") as f:
        pieces = grown_gpt(lambda offset, length: os.pread(f.fileno(), length, offset), size, disk_bytes)
        return pieces or [(0, grown_mbr(os.pread(f.fileno(), SECTOR, 0), size, disk_bytes))]


class Served:
    """The configuration of one serving process and its events file."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.image = Path(config["image"])
        self.image_bytes = self.image.stat().st_size
        self.map = "".join(f"{k} {o} {n}\n" for k, o, n in extents(self.image))
        self.events = Path(config["events"])
        self.lock = threading.Lock()

    def event(self, kind: str, **data: Any) -> None:
        """Append one event (JSON line) for the driver."""
        with self.lock, open(self.events, "a") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **data}) + "\n")
            f.flush()


def handler(served: Served) -> type[BaseHTTPRequestHandler]:
    """The request handler bound to ``served``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
            pass

        def send(self, body: bytes, status: int = 200, kind: str = "application/octet-stream") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_file(self, path: Path) -> None:
            size = path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(path, "rb") as f:
                while chunk := f.read(1024 * 1024):
                    self.wfile.write(chunk)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            c = served.config
            try:
                if url.path == "/boot.ipxe":
                    served.event("netboot", client=self.client_address[0])
                    self.send(c["ipxe"].encode(), kind="text/plain")
                elif url.path == "/vmlinuz":
                    self.send_file(Path(c["kernel"]))
                elif url.path == "/initrd.gz":
                    self.send_file(Path(c["initrd"]))
                elif url.path in ("/instant.gz", "/grow.gz"):
                    self.send_file(Path(c[url.path[1:].removesuffix(".gz")]))
                elif url.path == "/plan":
                    self.send(c["plan"].encode(), kind="text/plain")
                elif url.path == "/map":
                    self.send(served.map.encode(), kind="text/plain")
                elif url.path == "/data":
                    offset, length = int(q["offset"]), int(q["length"])
                    if offset < 0 or length <= 0 or offset + length > served.image_bytes or length > MAX_EXTENT:
                        self.send(b"bad range\n", 416, "text/plain")
                        return
                    with open(served.image, "rb") as f:
                        self.send(os.pread(f.fileno(), length, offset))
                elif url.path == "/tables":
                    pieces = tables(served.image, int(q["disk_bytes"]))
                    self.send("".join(f"{o} {len(b)}\n" for o, b in pieces).encode(), kind="text/plain")
                elif url.path == "/table":
                    self.send(dict(tables(served.image, int(q["disk_bytes"])))[int(q["offset"])])
                elif url.path in ("/chosen", "/booting", "/progress", "/grown", "/done", "/fail"):
                    served.event(url.path[1:], **q)
                    self.send(b"ok\n", kind="text/plain")
                else:
                    self.send(b"not found\n", 404, "text/plain")
            except (KeyError, ValueError):
                self.send(b"bad request\n", 400, "text/plain")
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


def serve(config: dict[str, Any]) -> None:
    """Serve until killed."""
    served = Served(config)
    host, port = config["listen"].rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), handler(served))
    served.event("listening", listen=config["listen"])
    server.serve_forever()


def main(argv: list[str]) -> int:
    """``pxeserve CONFIG TOKEN``: the token only marks the process as this run's."""
    serve(json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
