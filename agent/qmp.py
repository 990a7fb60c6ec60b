"""A disk of a running QEMU guest, captured through QMP with persistent dirty bitmaps.

SOURCE ``qmp+unix:///path/to/qmp.sock?node=NODE[&scratch=DIR]``: NODE is a block node name or a
device name (``-drive`` id such as ``virtio0``); DIR holds the temporary fleecing overlay and NBD
socket (default: the QMP socket's folder, which QEMU can reach).

Each capture follows QEMU's ``docs/interop/bitmaps.rst`` (pull mode with image fleecing):

1. One ``transaction`` creates the new tracking bitmap ``N`` (persistent on qcow2), copies the
   base bitmap ``B`` into a disabled bitmap ``F`` (incrementals only), and starts a
   ``blockdev-backup sync=none`` into a temporary qcow2 overlay whose backing is the disk: from
   that instant the overlay is a frozen point-in-time view (copy-before-write), ``N`` records
   every later write and ``F`` holds exactly the writes between the base point and the freeze.
2. QEMU's NBD server exports the overlay with the ``qemu:dirty-bitmap:F`` context; the dirty
   extents (or everything, for a full) are read from it.
3. After the point is durable in the archive, ``B`` and any leftovers are removed (``N`` goes on
   recording for the next capture); after a failure ``N`` is removed and ``B`` kept, so the next
   capture still covers every change.

The bitmap that tracks changes since a point is named in that point's ``source`` field
(``...&bitmap=NAME``), so the chain is checked against the archive itself, never a local state
file that could drift. A missing, inconsistent (QEMU crashed), disabled or busy bitmap, or a disk
whose size changed, makes the capture a full read-and-hash, and the plan says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode, urlsplit

from lifeboat.agent.nbd import FrozenView, NbdConnection, NbdError, merge_extents
from lifeboat.agent.plan import MODE_BITMAP, MODE_FULL, BackupPlan, CaptureError, Guarantees
from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.errors import SourceError
from lifeboat.archive.points import now_utc
from lifeboat.plumbing.errors import UsageError
from lifeboat.plumbing.nbd import STATE_DIRTY
from lifeboat.plumbing.qmp import QmpClient, QmpCommandError, QmpError

SCHEME = "qmp+unix"
TMP_PREFIX = "lifeboat-"
JOB_TIMEOUT = 30.0


def bitmap_prefix(arc: Archive, machine: str) -> str:
    """Prefix of the tracking bitmaps of one machine in one archive (several archives may track one disk)."""
    digest = hashlib.sha256(f"{arc.config['id']}/{machine}".encode()).hexdigest()[:16]
    return f"lifeboat-{digest}-"


def point_param(info: PointInfo, scheme: str, key: str) -> str | None:
    """A query parameter of a point's ``source`` when it came from ``scheme``."""
    if not info.source.startswith(scheme + "://"):
        return None
    values = parse_qs(urlsplit(info.source).query).get(key)
    return values[0] if values else None


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """(socket path, query parameters) of a ``qmp+unix://`` spec."""
    parts = urlsplit(spec)
    if parts.scheme != SCHEME or not parts.path:
        raise UsageError(f"source {spec!r}: expected qmp+unix:///path/to/qmp.sock?node=NODE")
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if not params.get("node"):
        raise UsageError(f"source {spec!r}: add ?node=NODE (a block node name or a drive id)")
    return parts.path, params


def _qemu_img_create(path: Path, size: int) -> None:
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        path.unlink(missing_ok=True)
        raise CaptureError(f"cannot create the fleecing overlay {path}: {proc.stderr.strip()}")


def new_overlay(path: Path, size: int) -> None:
    """An empty qcow2 image of ``size`` bytes at ``path`` (the fleecing overlay): a copy of one
    made by ``qemu-img create`` once per size and kept in the user's cache folder. The copy takes
    well under a millisecond; ``qemu-img create`` took 20-40 ms (a process and four fdatasyncs),
    a tenth of a whole incremental. A cache that cannot be written, or a template that is not a
    qcow2 image any more, only costs that: the overlay is then made by ``qemu-img`` directly."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lifeboat"
    template = cache / f"empty-{size}.qcow2"
    try:
        with template.open("rb") as f:
            usable = f.read(4) == b"QFI\xfb"
    except OSError:
        usable = False
    try:
        if not usable:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".empty-{size}.{secrets.token_hex(4)}.qcow2"
            _qemu_img_create(tmp, size)
            os.replace(tmp, template)  # whole or absent: a killed capture leaves no half template
        shutil.copyfile(template, path)
    except OSError:
        _qemu_img_create(path, size)


def tracking_granularity(size: int) -> int:
    """The granularity of a new tracking bitmap: 4 KiB, a file system block, so a scattered 4 KiB
    write costs 4 KiB in the next incremental, not QEMU's default 64 KiB; coarser only where the
    bitmap would pass 2^24 bits (2 MiB of QEMU memory: disks over 64 GiB)."""
    granularity = 4096
    while size > granularity << 24:
        granularity *= 2
    return granularity


class QmpSource:
    """A running QEMU's disk; ``prepare`` freezes a view of it, ``read`` reads that view."""

    guarantees: ClassVar[Guarantees] = Guarantees(crash_consistent=True, tracks_changes=True)

    def __init__(self, spec: str, *, timeout: float = 60.0) -> None:
        self.spec = spec
        self.socket_path, params = parse_spec(spec)
        self.node_arg = params["node"]
        self.scratch_dir = Path(params.get("scratch") or os.path.dirname(self.socket_path) or tempfile.gettempdir())
        self.timeout = timeout
        self._qmp: QmpClient | None = None
        try:
            self._connect()  # no QEMU there (yet): an operation that failed, which protect retries
        except CaptureError as e:
            raise CaptureError(f"source {spec}: {e}") from None
        try:
            self.node, self.driver, self.size = self._resolve_node()
        finally:
            self._disconnect()
        self.name = f"{SCHEME}://{self.socket_path}?{urlencode({'node': self.node_arg})}"
        self._view: FrozenView | None = None
        self._token: str | None = None
        self._new_bitmap: str | None = None
        self._prefix: str | None = None
        self._base_bitmap: str | None = None
        self._exported = False

    # -- QMP helpers ---------------------------------------------------------------------------
    def _connect(self) -> QmpClient:
        """A QMP connection, held only during a capture: QEMU's monitor takes one client at a time."""
        if self._qmp is None:
            try:
                self._qmp = QmpClient(self.socket_path, timeout=self.timeout)
            except QmpError as e:
                raise CaptureError(str(e)) from None
        return self._qmp

    def _disconnect(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            qmp.close()

    def cmd(self, command: str, /, **args: Any) -> Any:
        """Run a QMP command; a failure or a lost connection is a ``CaptureError``."""
        qmp = self._connect()
        try:
            return qmp.cmd(command, **args)
        except QmpError as e:
            if not isinstance(e, QmpCommandError):
                self._disconnect()  # the connection is broken: reconnect next time
            raise CaptureError(str(e)) from None

    def _resolve_node(self) -> tuple[str, str, int]:
        nodes = self.cmd("query-named-block-nodes", flat=True)
        by_name = {n["node-name"]: n for n in nodes}
        node = by_name.get(self.node_arg)
        if node is None:
            for dev in self.cmd("query-block"):
                if self.node_arg in (dev.get("device"), dev.get("qdev")) and "inserted" in dev:
                    node = by_name.get(dev["inserted"]["node-name"])
                    break
        if node is None:
            names = sorted(n for n in by_name if not n.startswith("#"))
            raise SourceError(f"source {self.spec}: QEMU has no block node or drive {self.node_arg!r} "
                              f"(nodes: {', '.join(names) or 'none named'})")
        return node["node-name"], node["drv"], int(node["image"]["virtual-size"])

    def node_info(self) -> dict[str, Any]:
        """The current ``query-named-block-nodes`` entry of the disk's node."""
        for n in self.cmd("query-named-block-nodes", flat=True):
            if n["node-name"] == self.node:
                return dict(n)
        raise CaptureError(f"QEMU at {self.socket_path}: block node {self.node!r} is gone")

    def bitmaps(self) -> dict[str, dict[str, Any]]:
        """The dirty bitmaps of the disk's node, by name."""
        return {b["name"]: b for b in self.node_info().get("dirty-bitmaps", []) if "name" in b}

    # -- planning ------------------------------------------------------------------------------
    def _choose_base(self, arc: Archive, machine: str, size: int,
                     bitmaps: dict[str, dict[str, Any]]) -> tuple[PointInfo | None, str | None]:
        """The base point and its bitmap, or (None, why a full read is needed)."""
        points = arc.points(machine)
        if not points:
            return None, None
        newest_named: tuple[PointInfo, str] | None = None
        for info in reversed(points):
            name = point_param(info, SCHEME, "bitmap")
            if name is None:
                continue
            newest_named = newest_named or (info, name)
            if name not in bitmaps:
                continue
            bm = bitmaps[name]
            if bm.get("inconsistent"):
                return None, (f"bitmap {name} of point {info.point} is inconsistent: QEMU stopped without "
                              "saving it (a crash or kill), so it may have missed writes")
            if not bm.get("recording", False):
                return None, f"bitmap {name} of point {info.point} was disabled, so it may have missed writes"
            if bm.get("busy"):
                return None, f"bitmap {name} of point {info.point} is busy with another operation"
            if info.size != size:
                return None, f"the disk was resized from {info.size} to {size} bytes since point {info.point}"
            return info, name
        if newest_named is None:
            return None, f"no point of {machine} was taken with a QEMU dirty bitmap"
        info, name = newest_named
        return None, (f"bitmap {name} of point {info.point} is missing (removed; or QEMU restarted after a "
                      "kill before it saved the bitmap, or with a non-persistent one; or another disk image)")

    def _cleanup_stale(self) -> None:
        """Remove what a killed capture of ours left in QEMU (exports, jobs, overlays, frozen bitmaps)."""
        ours = [e for e in self.cmd("query-block-exports") if str(e.get("id", "")).startswith(TMP_PREFIX)]
        for e in ours:
            with contextlib.suppress(CaptureError):
                self.cmd("block-export-del", id=e["id"], mode="hard")
        if ours:
            with contextlib.suppress(CaptureError):
                self.cmd("nbd-server-stop")
        for job in self.cmd("query-block-jobs"):
            if str(job.get("device", "")).startswith(TMP_PREFIX):
                with contextlib.suppress(CaptureError):
                    self.cmd("block-job-cancel", device=job["device"], force=True)
        self._wait_jobs_gone()
        for n in self.cmd("query-named-block-nodes", flat=True):
            if n["node-name"].startswith(TMP_PREFIX + "fleece-"):
                with contextlib.suppress(CaptureError):
                    self.cmd("blockdev-del", **{"node-name": n["node-name"]})
        for name in self.bitmaps():
            if name.startswith(TMP_PREFIX + "frozen-"):
                with contextlib.suppress(CaptureError):
                    self.cmd("block-dirty-bitmap-remove", node=self.node, name=name)
        for stale in self.scratch_dir.glob(TMP_PREFIX + "fleece-*.qcow2"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def _wait_jobs_gone(self, job: str | None = None) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            jobs = [j["device"] for j in self.cmd("query-block-jobs")
                    if (j["device"] == job if job else str(j["device"]).startswith(TMP_PREFIX))]
            if not jobs:
                return
            time.sleep(0.02)
        raise CaptureError(f"QEMU at {self.socket_path}: block job(s) did not end within {JOB_TIMEOUT:.0f} s")

    def prepare(self, arc: Archive, machine: str) -> BackupPlan:
        """Freeze a point-in-time view, start tracking the next changes, and plan what to read."""
        self._cleanup_stale()
        info = self.node_info()
        size = int(info["image"]["virtual-size"])
        self.size = size
        bitmaps = {b["name"]: b for b in info.get("dirty-bitmaps", []) if "name" in b}
        base, why = self._choose_base(arc, machine, size, bitmaps)
        reason = None if base is not None else why
        token = secrets.token_hex(6)
        self._token = token
        self._prefix = bitmap_prefix(arc, machine)
        self._new_bitmap = f"{self._prefix}{token}"
        self._base_bitmap = point_param(base, SCHEME, "bitmap") if base else None
        persistent = self.driver == "qcow2"
        notes = [] if persistent else [f"the disk's format is {self.driver}, not qcow2: the bitmap is not "
                                       "persistent, so a QEMU restart forces a full backup"]
        scratch = self._scratch_file()
        fleece, job, frozen = self._names()
        actions: list[dict[str, Any]] = [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": self.node, "name": self._new_bitmap, "persistent": persistent,
                      "granularity": tracking_granularity(size)}},
        ]
        if base is not None:
            base_granularity = bitmaps[self._base_bitmap]["granularity"]
            actions += [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": self.node, "name": frozen, "disabled": True, "granularity": base_granularity}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": self.node, "target": frozen, "bitmaps": [self._base_bitmap]}},
            ]
        actions.append({"type": "blockdev-backup",
                        "data": {"device": self.node, "target": fleece, "sync": "none", "job-id": job}})
        try:
            new_overlay(scratch, size)
            self.cmd("blockdev-add", **{"driver": "qcow2", "node-name": fleece, "backing": self.node,
                                        "file": {"driver": "file", "filename": str(scratch)}})
            started = now_utc()
            self.cmd("transaction", actions=actions)
        except BaseException:
            with contextlib.suppress(CaptureError):
                self._teardown(remove_new=False)  # the transaction is atomic: no new bitmap exists
            raise
        # From here on the new bitmap exists: any failure must remove it (abort) to keep the chain.
        try:
            sock = self._nbd_socket()
            with contextlib.suppress(OSError):
                sock.unlink()
            self._start_nbd_server(sock)
            export: dict[str, Any] = {"type": "nbd", "id": self._export_id(), "node-name": fleece,
                                      "name": self._export_id()}
            if base is not None:
                export["bitmaps"] = [frozen]
            self.cmd("block-export-add", **export)
            self._exported = True
            changed: list[tuple[int, int]] | None = None
            if base is not None:
                ctx = f"qemu:dirty-bitmap:{frozen}"
                conn = NbdConnection(str(sock), self._export_id(), (ctx,))
                try:
                    changed = merge_extents(conn.block_status(ctx, 0, size), STATE_DIRTY)
                finally:
                    conn.close()
            self._view = FrozenView(str(sock), self._export_id(), arc.backup_reads(size, changed, base))
        except (CaptureError, NbdError) as e:
            self.abort()
            raise CaptureError(f"QEMU at {self.socket_path}: cannot export the frozen view: {e}") from None
        except BaseException:
            self.abort()
            raise
        query = {"node": self.node, "bitmap": self._new_bitmap}
        self.name = f"{SCHEME}://{self.socket_path}?{urlencode(query)}"
        mode = MODE_BITMAP if base is not None else MODE_FULL
        return BackupPlan(mode=mode, changed=changed, base=base, started=started, fallback_reason=reason,
                          notes=notes, size=size)

    def _start_nbd_server(self, sock: Path) -> None:
        """QEMU has one NBD server: restart one a killed capture of ours left, refuse another tool's."""
        try:
            self.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
            return
        except CaptureError as e:
            if "already running" not in str(e):
                raise
        others = [x["id"] for x in self.cmd("query-block-exports")]
        if others:
            raise CaptureError(f"QEMU at {self.socket_path}: its NBD server is in use by another tool "
                               f"(exports {', '.join(others)}); try again when it is done")
        self.cmd("nbd-server-stop")
        self.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})

    def _names(self) -> tuple[str, str, str]:
        assert self._token
        return (f"{TMP_PREFIX}fleece-{self._token}", f"{TMP_PREFIX}job-{self._token}",
                f"{TMP_PREFIX}frozen-{self._token}")

    def _export_id(self) -> str:
        return f"{TMP_PREFIX}export-{self._token}"

    def _scratch_file(self) -> Path:
        return self.scratch_dir / f"{TMP_PREFIX}fleece-{self._token}.qcow2"

    def _nbd_socket(self) -> Path:
        sock = self.scratch_dir / f"{TMP_PREFIX}nbd-{self._token}.sock"
        if len(str(sock)) >= 100:  # a unix socket path must fit in 108 bytes
            sock = Path(tempfile.gettempdir()) / f"{TMP_PREFIX}nbd-{self._token}.sock"
        return sock

    # -- reading -------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Bytes of the frozen view (only between ``prepare`` and ``commit``/``abort``)."""
        if self._view is None:
            raise UsageError(f"source {self.name}: read before prepare()")
        try:
            return self._view.read(offset, length)
        except NbdError as e:
            raise CaptureError(f"QEMU at {self.socket_path} stopped serving the frozen view "
                               f"(the guest stopped or QEMU died?): {e}") from None

    # -- ending --------------------------------------------------------------------------------
    def _teardown(self, *, remove_new: bool) -> None:
        """Remove the export, the job, the overlay and the frozen bitmap; optionally the new bitmap."""
        if self._token is None:
            return
        fleece, job, frozen = self._names()
        if self._view is not None:
            self._view.close()
            self._view = None
        if self._exported:
            self.cmd("block-export-del", id=self._export_id(), mode="hard")
            self.cmd("nbd-server-stop")
            self._exported = False
        if any(j["device"] == job for j in self.cmd("query-block-jobs")):
            self.cmd("block-job-cancel", device=job, force=True)
            self._wait_jobs_gone(job)
        if any(n["node-name"] == fleece for n in self.cmd("query-named-block-nodes", flat=True)):
            self.cmd("blockdev-del", **{"node-name": fleece})
        bitmaps = self.bitmaps()
        if frozen in bitmaps:
            self.cmd("block-dirty-bitmap-remove", node=self.node, name=frozen)
        if remove_new and self._new_bitmap in bitmaps:
            self.cmd("block-dirty-bitmap-remove", node=self.node, name=self._new_bitmap)
        with contextlib.suppress(OSError):
            self._scratch_file().unlink()
        with contextlib.suppress(OSError):
            self._nbd_socket().unlink()
        self._token = None

    def commit(self, info: PointInfo) -> None:
        """The point is durable: end fleecing and drop every older tracking bitmap of this machine."""
        try:
            self._teardown(remove_new=False)
            for name in self.bitmaps():
                if self._prefix and name.startswith(self._prefix) and name != self._new_bitmap:
                    self.cmd("block-dirty-bitmap-remove", node=self.node, name=name)
        finally:
            self._disconnect()

    def abort(self) -> None:
        """The capture failed: end fleecing, drop the new bitmap, keep the base one (best effort)."""
        try:
            self._teardown(remove_new=True)
        except CaptureError:
            self._token = None  # QEMU is gone or refuses: the next prepare cleans up what it can
        finally:
            self._disconnect()

    def close(self) -> None:
        """Abort an unfinished capture and close the QMP connection."""
        if self._token is not None:
            self.abort()
        self._disconnect()

    def __enter__(self) -> QmpSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
