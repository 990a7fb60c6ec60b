"""Incrementals at the granularity of change tracking, not of chunks.

A dirty bitmap names changed 64 KiB blocks; a chunk (a "slot" of the disk) is 4 MiB. Storing
each touched slot whole would read, hash and compress up to 64 times the changed bytes, and a
scattered 1 % change touches most slots. So the changed runs of several slots are packed into
one new *patch chunk*, and the point's table lays them over its slots (``formats.Patch``). The
read cost stays bounded: a slot draws from at most ``MAX_REFS`` stored chunks, and a slot whose
change would exceed that, or covers more than half of it, is read whole and stored whole again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lifeboat.archive.formats import ZERO_ID, ChunkTable, Patch, slot_length

MAX_REFS = 4  # stored chunks one slot may be read from (its base chunk and patch chunks)
# Patch chunks close at this size (or the chunk size, if smaller): a few MiB of changes then make
# several jobs that hash and compress on every core while the next ones are read.
PATCH_TARGET = 1024 * 1024

Run = tuple[int, int, int]  # slot, offset in the slot, length


@dataclass(frozen=True)
class Job:
    """One unit of a backup: a whole slot (``runs`` empty), or changed runs packed into one
    patch chunk (``slot`` is -1)."""

    slot: int = -1
    runs: tuple[Run, ...] = ()


def _runs_by_slot(changed: Iterable[tuple[int, int]], size: int, cs: int) -> dict[int, list[tuple[int, int]]]:
    """Changed byte extents clipped to the disk, merged, and cut at slot boundaries."""
    by_slot: dict[int, list[tuple[int, int]]] = {}
    for off, length in sorted(changed):
        off, end = max(off, 0), min(off + length, size)
        while off < end:
            slot, inner = divmod(off, cs)
            take = min(end - off, slot_length(size, cs, slot) - inner)
            runs = by_slot.setdefault(slot, [])
            if runs and runs[-1][0] + runs[-1][1] >= inner:  # overlapping or adjacent: merge
                start = runs[-1][0]
                runs[-1] = (start, max(runs[-1][0] + runs[-1][1], inner + take) - start)
            else:
                runs.append((inner, take))
            off += take
    return by_slot


def cut(patches: Iterable[Patch], runs: Iterable[tuple[int, int]]) -> list[Patch]:
    """``patches`` with the byte ranges ``runs`` (offset, length in the slot) taken out."""
    out = list(patches)
    for start, length in runs:
        end = start + length
        kept: list[Patch] = []
        for p in out:
            p_end = p.offset + p.length
            if p_end <= start or p.offset >= end:
                kept.append(p)
                continue
            if p.offset < start:  # the part before the run survives
                kept.append(Patch(p.slot, p.offset, start - p.offset, p.chunk_id, p.chunk_offset, p.chunk_length))
            if p_end > end:  # the part after it
                skip = end - p.offset
                coff = p.chunk_offset + skip if p.chunk_id != ZERO_ID else 0
                kept.append(Patch(p.slot, end, p_end - end, p.chunk_id, coff, p.chunk_length))
        out = kept
    return out


def plan_jobs(size: int, cs: int, changed: Iterable[tuple[int, int]] | None, base: ChunkTable | None) -> list[Job]:
    """The jobs of a backup, in the order it reads them: every slot when ``changed`` is None;
    otherwise the changed runs, packed into patch chunks of about ``PATCH_TARGET`` bytes (at most
    ``cs``), and the slots that must be stored whole."""
    count = -(-size // cs)
    if changed is None or base is None:
        return [Job(slot=i) for i in range(count)]
    jobs: list[Job] = []
    group: list[Run] = []
    group_bytes = 0
    for slot, runs in sorted(_runs_by_slot(changed, size, cs).items()):
        dirty = sum(n for _, n in runs)
        survivors = cut(base.patches.get(slot, ()), runs)
        refs = {base.ids[slot]} | {p.chunk_id for p in survivors}
        refs.discard(ZERO_ID)
        if 2 * dirty > slot_length(size, cs, slot) or len(refs) + 1 > MAX_REFS:
            jobs.append(Job(slot=slot))
            continue
        if group and group_bytes + dirty > min(cs, PATCH_TARGET):  # a slot's runs stay in one patch chunk
            jobs.append(Job(runs=tuple(group)))
            group, group_bytes = [], 0
        group.extend((slot, inner, n) for inner, n in runs)
        group_bytes += dirty
    if group:
        jobs.append(Job(runs=tuple(group)))
    return jobs


def job_reads(jobs: Iterable[Job], size: int, cs: int) -> list[tuple[int, int]]:
    """The (offset, length) reads of ``jobs``, in order (a change-tracking source reads ahead)."""
    reads: list[tuple[int, int]] = []
    for job in jobs:
        if job.runs:
            reads.extend((slot * cs + inner, n) for slot, inner, n in job.runs)
        else:
            reads.append((job.slot * cs, slot_length(size, cs, job.slot)))
    return reads


def lay_patches(table: ChunkTable, new: Iterable[Patch]) -> None:
    """Lay freshly stored patches over ``table`` (each slot's older patches are cut under them);
    a slot left all zeros by them drops its patches."""
    by_slot: dict[int, list[Patch]] = {}
    for p in new:
        by_slot.setdefault(p.slot, []).append(p)
    for slot, ps in by_slot.items():
        merged = sorted(cut(table.patches.get(slot, ()), ((p.offset, p.length) for p in ps)) + ps,
                        key=lambda p: p.offset)
        table.patches[slot] = merged
        if table.is_zero(slot):
            del table.patches[slot]
