"""Replication: copy what another archive lacks, so that a disaster cannot take every copy.

Works on the ``Backend`` interface only, so the destination (and the source) may be a directory,
the archive server or an object store. Objects are copied as stored: an encrypted archive stays
encrypted and no key is needed (with one, every blob is also authenticated before it is sent).

- **Identity.** The destination is a replica: it holds the source's ``config`` object byte for
  byte (an empty destination gets it first). Chunk ids of an encrypted archive are keyed by the
  salt in ``config``, and packs are copied unchanged, so only an archive with the same id, chunk
  size and encryption parameters can take them; any other archive at DEST is refused.
- **Only what is missing.** Packs are immutable and named at random, so a pack key present at the
  destination is that pack. A point is copied when its manifest is absent there, with the source
  packs holding its chunks that the destination does not list, unless every chunk the point needs
  from such a pack is already in a pack of the destination (a pack that the source's prune
  rewrote holds chunks the replica has under the old pack's name: it is not copied again).
- **Publish last.** A point's manifest is written only after every pack it needs is stored and
  checked at the destination; a ``kill -9`` at any moment leaves at most unreferenced packs (and
  ``.tmp-`` leftovers), which the next run reuses and ``prune`` collects. So a second run copies
  only what is still missing, and no point is ever visible without its chunks.
- **Checked both ways.** Before a pack is sent its trailer, index CRC and magic are checked and
  every blob is decoded (zstd checksum, stored chunks hashed; encrypted blobs authenticated when
  the key is given): a damaged source pack is refused and the points that need it are not
  published. After it is stored, the destination's copy is read back (size, trailer and CRC'd
  index, compared with the source's): what the format gives without a second full download.
  Manifests are small: they are read back whole and compared byte for byte.
- **Bandwidth.** ``bwlimit`` throttles reads of the source (``throttle.py``), which paces the copy.
- **Following prunes.** A point that the source's prune removed (its tombstone
  ``pruned/<machine>/<point>`` is there) is removed from the destination too, with a tombstone
  there (so a replica of the replica follows); a point whose manifest merely went missing at the
  source is never removed off-site. Then, holding the destination's exclusive lock, the kept
  points' manifests that prune's rollup rewrote are copied again, and the destination's packs
  that the source no longer has and no point of the destination needs are deleted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lifeboat.archive.backend import Backend, open_backend
from lifeboat.archive.chunks import Codec, Keys
from lifeboat.archive.errors import ArchiveNotFound, CorruptChunk, FormatError, StorageError, WrongKey
from lifeboat.archive.formats import parse_point
from lifeboat.archive.local import LocalBackend
from lifeboat.archive.packs import PACK_PREFIX, ChunkIndex, parse_pack, read_pack_index
from lifeboat.archive.points import POINT_PREFIX, PRUNED_PREFIX, PointInfo, check_machine, now_utc
from lifeboat.archive.store import CONFIG_KEY, Progress, read_key_file
from lifeboat.archive.throttle import ThrottledBackend
from lifeboat.plumbing.errors import UsageError

# Config fields that make two archives one: chunk ids and blobs are only valid under the same ones.
IDENTITY = ("format", "id", "chunk_size", "encryption")
COPY_THREADS = 4  # packs in flight: a remote destination answers each upload after a round trip


class ReplicaMismatch(UsageError):
    """The destination holds another archive, or cannot be a replica of this one."""


@dataclass
class ReplicationReport:
    """What one run copied, and how far the destination is behind."""

    to: str
    machines: list[str]
    objects_copied: int = 0
    bytes_copied: int = 0
    points_published: list[str] = field(default_factory=list)
    points_in_step: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # point -> why it was not published
    lag_seconds: float = 0.0
    initialised: bool = False
    points_removed: list[str] = field(default_factory=list)  # pruned at the source, so removed here
    packs_removed: int = 0

    @property
    def ok(self) -> bool:
        """Every point of the chosen machines is at the destination."""
        return not self.refused

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "to": self.to,
            "machines": self.machines,
            "objects_copied": self.objects_copied,
            "bytes_copied": self.bytes_copied,
            "points_published": len(self.points_published),
            "published": self.points_published,
            "points_in_step": self.points_in_step,
            "refused": self.refused,
            "lag_seconds": self.lag_seconds,
            "initialised": self.initialised,
            "points_removed": self.points_removed,
            "packs_removed": self.packs_removed,
            "ok": self.ok,
        }


@dataclass(frozen=True)
class Plan:
    """The points the destination lacks, oldest first, with the packs each needs that it lacks."""

    points: list[tuple[PointInfo, bytes, list[str]]]  # info, manifest bytes, packs to be there first
    refused: dict[str, str]  # point -> why it cannot be published
    missing: list[PointInfo]  # every readable point absent at the destination (for the lag)
    in_step: int
    sizes: dict[str, int]

    @property
    def bytes_to_copy(self) -> int:
        """Bytes of the packs this plan copies (each once)."""
        return sum(self.sizes.values())


def _config(backend: Backend, what: str) -> tuple[bytes, dict[str, Any]] | None:
    try:
        raw = backend.get(CONFIG_KEY)
    except KeyError:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or any(k not in doc for k in IDENTITY):
            raise ValueError("fields are missing")
    except ValueError as e:
        raise FormatError(f"{what} {backend.location}: config is damaged ({e})") from None
    return raw, doc


def _source_codec(config: dict[str, Any], key_file: str | None) -> Codec | None:
    """The codec that checks blobs before they are sent; None for an encrypted archive without its
    key (its packs are then checked by their structure only)."""
    enc = config.get("encryption")
    if not enc:
        return Codec()
    secret = read_key_file(key_file)
    if secret is None:
        return None
    keys = Keys(secret, bytes.fromhex(enc["salt"]))
    if keys.check_value() != enc["key_check"]:
        raise WrongKey("the key file does not open the source archive")
    return Codec(keys=keys)


def open_destination(dest: str, source: Backend, src_config: tuple[bytes, dict[str, Any]]) -> tuple[Backend, bool]:
    """The destination's backend, checked to be a replica of the source, or made one when it holds
    no archive yet (True then)."""
    if not dest:
        raise UsageError("--to DEST is empty: give an archive directory, an archive server URL or an S3 URL")
    backend = open_backend(dest)
    if backend.location == source.location or (
            isinstance(backend, LocalBackend) and isinstance(source, LocalBackend)
            and backend.root.resolve() == source.root.resolve()):
        raise ReplicaMismatch(f"--to {dest}: that is the source archive itself")
    try:
        found = _config(backend, "destination")
    except (FormatError, KeyError) as e:
        raise ReplicaMismatch(f"--to {dest}: {e}") from None
    if found is None:
        if any(True for _ in backend.list(PACK_PREFIX)) or any(True for _ in backend.list(POINT_PREFIX)):
            raise ReplicaMismatch(f"--to {dest}: holds archive objects but no config; not a lifeboat archive "
                                  "to replicate into")
        try:
            backend.put(CONFIG_KEY, src_config[0])
        except (StorageError, OSError) as e:
            raise ReplicaMismatch(f"--to {dest}: cannot create the replica there ({e})") from None
        return backend, True
    mine, theirs = src_config[1], found[1]
    differ = [k for k in IDENTITY if mine.get(k) != theirs.get(k)]
    if differ:
        raise ReplicaMismatch(
            f"--to {dest} holds another archive (its {', '.join(differ)} differ from the source's): a replica "
            "must be initialised by replicate itself; give an empty location")
    return backend, False


def _chosen_machines(source: Backend, machines: Sequence[str]) -> list[str]:
    present = sorted({k.split("/")[1] for k in source.list(POINT_PREFIX) if k.count("/") == 2})
    if not machines:
        return present
    for m in machines:
        check_machine(m)
        if m not in present:
            raise UsageError(f"machine {m!r} has no points in the source archive {source.location}")
    return sorted(set(machines))


def plan(source: Backend, dest: Backend, machines: list[str]) -> Plan:
    """What the destination lacks: points whose manifest is absent, and the source packs they need
    that the destination does not list."""
    index = ChunkIndex.load(source)
    at_dest = set(dest.list(PACK_PREFIX))
    dest_index: ChunkIndex | None = None  # loaded only when a pack the destination lacks is needed
    sizes: dict[str, int] = {}
    points: list[tuple[PointInfo, bytes, list[str]]] = []
    refused: dict[str, str] = {}
    missing: list[PointInfo] = []
    in_step = 0
    for machine in machines:
        present = set(dest.list(f"{POINT_PREFIX}{machine}/"))
        for key in sorted(source.list(f"{POINT_PREFIX}{machine}/")):
            if key in present:
                in_step += 1
                continue
            name = f"{machine}@{key.rsplit('/', 1)[1]}"
            try:
                data = source.get(key)
                header, table = parse_point(key, data)
                info = PointInfo.from_header(header)
            except (FormatError, KeyError, TypeError) as e:
                refused[name] = f"manifest unreadable at the source: {e}"
                continue
            missing.append(info)
            packs: dict[str, list[bytes]] = {}
            for cid in table.referenced():
                loc = index.get(cid)
                if loc is None:
                    why = index.bad_packs and f" (damaged packs: {', '.join(sorted(index.bad_packs))})"
                    refused[name] = f"chunk {cid.hex()} is in no readable pack of the source{why or ''}"
                    break
                packs.setdefault(loc.pack, []).append(cid)
            else:
                need = []
                for p in sorted(set(packs) - at_dest):
                    if dest_index is None:
                        dest_index = ChunkIndex.load(dest)
                    if any(cid not in dest_index for cid in packs[p]):
                        need.append(p)
                for p in need:
                    if p not in sizes:
                        sizes[p] = source.size(p)
                points.append((info, data, need))
    points.sort(key=lambda p: (p[0].when, p[0].point))
    return Plan(points, refused, missing, in_step, sizes)


class _Copier:
    """Copies one pack: checked at the source, stored, read back at the destination."""

    def __init__(self, source: Backend, dest: Backend, codec: Codec | None, progress: Progress | None) -> None:
        self.source, self.dest, self.codec, self.progress = source, dest, codec, progress

    def attempt(self, key: str) -> int | str:
        """``copy``, with a damaged source pack answered by why (the points needing it are refused)."""
        try:
            return self.copy(key)
        except (FormatError, CorruptChunk, KeyError) as e:
            return str(e) if not isinstance(e, KeyError) else f"pack {key} vanished from the source"

    def copy(self, key: str) -> int:
        """Bytes copied; ``FormatError``/``CorruptChunk`` for a damaged source pack (nothing stored),
        ``StorageError`` when the stored copy does not read back the same."""
        data = self.source.get(key)
        entries = parse_pack(key, data)
        if self.codec is not None:
            for e in entries:
                self.codec.decode(e.chunk_id, data[e.offset:e.offset + e.length], e.raw_length)
        self.dest.put(key, data)
        try:
            stored = self.dest.size(key) == len(data) and read_pack_index(self.dest, key) == entries
        except (FormatError, KeyError) as e:
            raise StorageError(f"pack {key} does not read back at {self.dest.location}: {e}") from None
        if not stored:
            raise StorageError(f"pack {key} does not read back the same at {self.dest.location}")
        if self.progress:
            self.progress(len(data))
        return len(data)


def replicate(
    location: str,
    dest: str,
    machines: Sequence[str] = (),
    *,
    key_file: str | None = None,
    bwlimit: int | None = None,
    progress: Callable[[int], Progress] | None = None,
) -> ReplicationReport:
    """Copy the points of ``machines`` (all when empty) from the archive at ``location`` to the
    one at ``dest``, with the packs they need. ``progress`` is given the bytes to copy and returns
    the callback advanced by each pack."""
    if bwlimit is not None and bwlimit <= 0:
        raise UsageError(f"--bwlimit {bwlimit}: must be a positive number of bytes per second")
    source: Backend = open_backend(location)
    found = _config(source, "source archive")
    if found is None:
        raise ArchiveNotFound(f"no lifeboat archive at {location} (create one with 'lifeboat archive init')")
    codec = _source_codec(found[1], key_file)
    chosen = _chosen_machines(source, machines)
    target, initialised = open_destination(dest, source, found)
    report = ReplicationReport(to=target.location, machines=chosen, initialised=initialised)
    if bwlimit is not None:
        source = ThrottledBackend(source, bwlimit)
    with source.lock(exclusive=False), target.lock(exclusive=False):
        todo = plan(source, target, chosen)
        report.refused.update(todo.refused)
        report.points_in_step = todo.in_step
        copier = _Copier(source, target, codec, progress(todo.bytes_to_copy) if progress else None)
        done: set[str] = set()
        bad: dict[str, str] = {}
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            for info, manifest, packs in todo.points:
                name = f"{info.machine}@{info.point}"
                fresh = [p for p in packs if p not in done and p not in bad]
                for p, outcome in zip(fresh, pool.map(copier.attempt, fresh), strict=True):
                    if isinstance(outcome, str):
                        bad[p] = outcome
                    else:
                        done.add(p)
                        report.objects_copied += 1
                        report.bytes_copied += outcome
                damaged = [p for p in packs if p in bad]
                if damaged:
                    report.refused[name] = f"source pack {damaged[0]} is damaged, not copied: {bad[damaged[0]]}"
                    continue
                _publish(target, info.key, manifest)
                report.objects_copied += 1
                report.bytes_copied += len(manifest)
                report.points_published.append(name)
    with source.lock(exclusive=False):  # the destination's exclusive lock is taken inside, when needed
        _follow_prunes(source, target, chosen if machines else None, report)
    published = set(report.points_published)
    behind = [i for i in todo.missing if f"{i.machine}@{i.point}" not in published]
    report.lag_seconds = offsite_lag((i.when for i in behind), now_utc())
    return report


def _follow_prunes(source: Backend, dest: Backend, machines: list[str] | None, report: ReplicationReport) -> None:
    """Remove from ``dest`` the points of ``machines`` (all when None) that the source's prune
    removed, copy the manifests its rollup rewrote, and delete the packs no point needs any more
    (see the module docstring); nothing when the source pruned nothing ``dest`` still has."""
    tombs = {k[len(PRUNED_PREFIX):] for k in source.list(PRUNED_PREFIX)}
    chosen = set(machines) if machines is not None else {t.split("/", 1)[0] for t in tombs}
    gone = [k for m in sorted(chosen) for k in sorted(dest.list(f"{POINT_PREFIX}{m}/"))
            if k[len(POINT_PREFIX):] in tombs]
    if not gone:
        return
    with dest.lock(exclusive=True):
        for key in gone:
            rest = key[len(POINT_PREFIX):]
            if not dest.exists(PRUNED_PREFIX + rest):
                dest.put(PRUNED_PREFIX + rest, b"")
            dest.delete(key)
            report.points_removed.append(rest.replace("/", "@", 1))
        live: set[bytes] = set()
        for key in sorted(dest.list(POINT_PREFIX)):
            data = dest.get(key)
            if key.split("/")[1] in chosen:
                try:
                    fresh = source.get(key)
                except KeyError:
                    fresh = data
                if fresh != data:  # relinked by the source's rollup
                    _publish(dest, key, fresh)
                    data = fresh
            live.update(parse_point(key, data)[1].referenced())
        at_source = set(source.list(PACK_PREFIX))
        for pack in sorted(set(dest.list(PACK_PREFIX)) - at_source):
            try:
                entries = read_pack_index(dest, pack)
            except (FormatError, KeyError):
                continue  # damaged: left for verify to report, never deleted blindly
            if not any(e.chunk_id in live for e in entries):
                dest.delete(pack)
                report.packs_removed += 1


def offsite_lag(behind: Iterable[datetime], now: datetime) -> float:
    """How far the off-site copy lags, from the times of the points not yet there: the age of the
    newest (0 when every point is), i.e. the history a loss of this site would take with it.
    ``lifeboat replicate --json``, ``protect --replicate-to``'s status and the dashboard report this."""
    newest = max(behind, default=None)
    return 0.0 if newest is None else round(max(0.0, (now - newest).total_seconds()), 3)


def _publish(dest: Backend, key: str, manifest: bytes) -> None:
    """Store a manifest (its packs are all there) and read it back whole."""
    dest.put(key, manifest)
    try:
        back = dest.get(key)
    except KeyError:
        back = b""
    if back != manifest:
        raise StorageError(f"point manifest {key} does not read back the same at {dest.location}")
