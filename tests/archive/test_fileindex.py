"""The file index in the archive (``archive/fileindex.py``): pieces are deduplicated between points,
``find`` answers from the index alone, prune removes the index of pruned points and the pieces
no one names, and an encrypted archive shows no path in its objects."""

from __future__ import annotations

from pathlib import Path

from lifeboat.archive import Archive, PointInfo
from lifeboat.archive.fileindex import (
    PIECE_PREFIX,
    FileRecord,
    FsIndex,
    find,
    literal_of,
    manifest_key,
    parse_piece,
    pattern_matcher,
    read_index,
    split_pieces,
    write_index,
)
from lifeboat.archive.prune import prune
from tests.archive.helpers import BytesSource


def tree(n: int, changed: dict[str, int] | None = None) -> list[FileRecord]:
    """``n`` files in 20 directories; ``changed`` gives some of them another size."""
    out = [FileRecord(f"/d{i % 20:02d}", "d", 4096, 1) for i in range(20)]
    for i in range(n):
        path = f"/d{i % 20:02d}/file{i:05d}.txt"
        out.append(FileRecord(path, "f", (changed or {}).get(path, i), 1_700_000_000 + i))
    return out


def point(arc: Archive, machine: str, data: bytes) -> PointInfo:
    """A real point of a small disk (the index is stored beside points, not inside them)."""
    return arc.backup(machine, BytesSource(data))


def test_pieces_are_cut_by_content_so_a_change_moves_only_its_own_piece() -> None:
    a = list(split_pieces(sorted(tree(5000), key=lambda r: r.path)))
    b = list(split_pieces(sorted(tree(5000, {"/d07/file02007.txt": 1}), key=lambda r: r.path)))
    assert len(a) > 10
    assert len(set(a) ^ set(b)) == 2  # one piece out, one in
    added = sorted([*tree(5000), FileRecord("/d03/extra", "f", 1, 1)], key=lambda r: r.path)
    assert len(set(a) - set(split_pieces(added))) == 1


def test_find_names_the_points_holding_a_file_with_its_size(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=65536)
    p1 = point(arc, "web", b"a" * 65536)
    p2 = point(arc, "web", b"b" * 65536)
    p3 = point(arc, "web", b"c" * 65536)
    first = write_index(arc, p1, [FsIndex("/dev/sda1", "ext4", mountpoint="/", records=tree(3000))])
    changed = tree(3000, {"/d01/file00001.txt": 777})
    second = write_index(arc, p2, [FsIndex("/dev/sda1", "ext4", mountpoint="/", records=changed)])
    assert first["files"] == second["files"] == 3020
    assert first["pieces_new"] == first["pieces"] and second["pieces_new"] == 1

    matches, unindexed = find(arc, "web", "file00001.txt")
    assert [(m.point.point, m.record.size) for m in matches] == [(p1.point, 1), (p2.point, 777)]
    assert [p.point for p in unindexed] == [p3.point]
    assert len(find(arc, "web", "/d0[12]/file0000?.txt")[0]) == 4  # whole-path pattern, both points
    assert find(arc, "web", "nothing-like-this")[0] == []
    got = read_index(arc, p2)
    assert got is not None and got[0].records == sorted(changed, key=lambda r: r.path)


def test_any_name_survives_a_piece() -> None:
    odd = [FileRecord('/a"b\\c\u00e9\n', "f", 1, 2), FileRecord("/not-utf8-\udcff", "l", 3, 4)]
    assert parse_piece(b"".join(split_pieces(odd))) == odd


def test_patterns_match_names_or_whole_paths() -> None:
    assert pattern_matcher("*.conf").fullmatch("/etc/app.conf")
    assert pattern_matcher("app.conf").fullmatch("/etc/app.conf")
    assert not pattern_matcher("app.conf").fullmatch("/etc/myapp.conf")
    assert pattern_matcher("/etc/*").fullmatch("/etc/app.conf")
    assert not pattern_matcher("/etc/*.conf").fullmatch("/srv/etc/app.conf")
    assert [literal_of(p) for p in ("*.conf", "/usr/share/doc/*/copyright", "[ab]*", "x[ab]cd?", 'a"b')] == [
        b".conf", b"/usr/share/doc/", b"", b"cd", b""]


def test_prune_removes_the_index_of_pruned_points_and_unnamed_pieces(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), chunk_size=65536)
    p1 = point(arc, "web", b"a" * 65536)
    p2 = point(arc, "web", b"b" * 65536)
    write_index(arc, p1, [FsIndex("/dev/sda1", "ext4", records=tree(2000))])
    write_index(arc, p2, [FsIndex("/dev/sda1", "ext4", records=tree(2000, {"/d05/file00005.txt": 9}))])
    pieces_before = set(arc.backend.list(PIECE_PREFIX))
    arc.config["retention"] = {"keep_last": 1}
    report = prune(arc)
    assert [p.point for p in report.removed] == [p1.point]
    assert report.index_manifests_deleted == 1 and report.index_pieces_deleted == 1
    assert not arc.backend.exists(manifest_key("web", p1.point))
    assert arc.backend.exists(manifest_key("web", p2.point))
    assert len(set(arc.backend.list(PIECE_PREFIX))) == len(pieces_before) - 1
    assert [m.record.size for m in find(arc, "web", "file00005.txt")[0]] == [9]


def test_an_encrypted_archive_keeps_paths_out_of_its_objects(tmp_path: Path) -> None:
    arc = Archive.init(str(tmp_path / "arc"), encrypt=True, key_file=str(tmp_path / "key"), chunk_size=65536)
    p1 = point(arc, "web", b"a" * 65536)
    write_index(arc, p1, [FsIndex("/dev/sda1", "ext4", records=[FileRecord("/etc/secret-name", "f", 1, 1)])])
    for key in arc.backend.list("index"):
        assert b"secret-name" not in arc.backend.get(key)
    reopened = Archive.open(str(tmp_path / "arc"), key_file=str(tmp_path / "key"))
    assert [m.record.path for m in find(reopened, "web", "secret-name")[0]] == ["/etc/secret-name"]
