"""Peak memory of ``lifeboat serve`` under clients that send large reads and never read a reply.

The two floods of issue 18: 48 connections x one 32 MiB read, and one connection with 64
pipelined 32 MiB reads; plus the same floods with a well-behaved client reading the whole export
meanwhile. For each: the server's RSS before (VmRSS, cold), its peak (VmHWM) and its RSS after the
flood has hung up (given back). The server's bound (``nbdserver/server.py``: ``--memory-limit``
256 MiB, ``--client-memory-limit`` 64 MiB) must show in the peak; the export is a 64 MiB point
of random bytes in 1 MiB chunks, so its decoded chunks (64 MiB) are part of every figure.

Run: ``.venv/bin/python bench/nbd_flood_bench.py`` (under a minute), or with ``--repo PATH`` to
measure another checkout (e.g. the code before the bound). Prints a table; ``--readme`` also
writes it into this folder's README.md (its own section).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lifeboat.archive import Archive  # noqa: E402
from lifeboat.archive.files import FileSource  # noqa: E402
from lifeboat.plumbing import nbd as P  # noqa: E402

MiB = 1024 * 1024
IMAGE = 64 * MiB
MAX_READ = 32 * MiB
README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- BEGIN nbd_flood_bench (written by bench/nbd_flood_bench.py) -->", "<!-- END nbd_flood_bench -->"


def status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), 4 * MiB))
        if not part:
            raise ConnectionError("server closed the connection")
        buf += part
    return bytes(buf)


def connect(port: int) -> socket.socket:
    """A client in the transmission phase (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    recv_exact(s, P.SERVER_GREETING.size)
    s.sendall(P.CLIENT_FLAGS.pack(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
              + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0))
    recv_exact(s, P.EXPORT_NAME_REPLY.size)
    return s


def good_read(port: int, image: bytes) -> bool:
    """A well-behaved client reads the export in 32 MiB reads; whether the bytes match."""
    with connect(port) as s:
        ok = True
        for off in range(0, len(image), MAX_READ):
            s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, off, MAX_READ))
            _, error, _ = P.SIMPLE_REPLY.unpack(recv_exact(s, 16))
            ok = ok and error == 0 and recv_exact(s, MAX_READ) == image[off : off + MAX_READ]
        return ok


def settle(pid: int) -> None:
    last = -1
    for _ in range(240):
        rss = status(pid, "VmRSS")
        if abs(rss - last) < MiB:
            return
        last = rss
        time.sleep(0.25)


def one(repo: Path, archive: Path, image: bytes, connections: int, reads: int, good: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lifeboat", "--archive", str(archive), "serve", "m",
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=repo, env=env)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().strip().rsplit(":", 1)[1].split("/")[0])
        before = status(proc.pid, "VmRSS")
        socks = []
        for _ in range(connections):
            s = connect(port)
            s.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, k, 0, MAX_READ) for k in range(reads)))
            socks.append(s)
        served = good_read(port, image) if good else None
        settle(proc.pid)
        peak = status(proc.pid, "VmHWM")
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        time.sleep(2)
        after = status(proc.pid, "VmRSS")
        return {"flood": f"{connections} x {reads} read{'s' if reads > 1 else ''} of 32 MiB",
                "good": served, "before": before, "peak": peak, "after": after}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose lifeboat serve is measured")
    ap.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lifeboat-flood-") as tmp:
        image = random.Random(18).randbytes(IMAGE)
        (Path(tmp) / "m.img").write_bytes(image)
        arc = Archive.init(str(Path(tmp) / "archive"), chunk_size=MiB)
        with FileSource(Path(tmp) / "m.img") as src:
            arc.backup("m", src)
        rows = [one(args.repo.resolve(), Path(tmp) / "archive", image, c, r, g)
                for c, r, g in ((48, 1, False), (1, 64, False), (1, 64, True), (3, 16, True))]
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = [f"`lifeboat serve` at {commit}, 64 MiB point in 1 MiB chunks, default limits; RSS in MiB",
             "", "| flood (never read) | well-behaved client meanwhile | RSS before | peak RSS (VmHWM) | RSS after |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        good = {None: "-", True: "served, bytes equal", False: "WRONG BYTES"}[r["good"]]
        lines.append(f"| {r['flood']} | {good} | {r['before'] // MiB} | {r['peak'] // MiB} | {r['after'] // MiB} |")
    table = "\n".join(lines)
    print(table)
    if args.readme:
        text = README.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text += f"\n## NBD server memory under a flood (`bench/nbd_flood_bench.py`)\n\n{block}\n"
        README.write_text(text)


if __name__ == "__main__":
    main()
