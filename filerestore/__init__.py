"""File-level restore: browse, copy out and index the files of any point without restoring its disk.

The point is served read-only by lifeboat's own NBD server (``nbdserver.background``, on a thread of
the calling process; no copy of the disk) and read by libguestfs over NBD: ext4, xfs, btrfs, vfat,
NTFS, partitions and LVM. libguestfs' Python binding comes from Debian (``python3-guestfs``) and
imports only under Debian's ``/usr/bin/python3``, not lifeboat's virtual environment: lifeboat runs
``helper.py`` under that interpreter as a child process and speaks JSON lines with it over
stdin/stdout (``session.GuestSession``). One appliance per session: it boots once (20 s or more),
with ``LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` (KVM crashed the appliance
on the machine this was built on), and answers every request of the session.

The file index (``archive.fileindex``) is built from ``PointFiles.walk``; ``indexed.ls`` lists a
directory from it without an appliance.
"""

from lifeboat.filerestore.session import (
    DestExists,
    Drive,
    EncryptedVolume,
    FileRestoreError,
    GuestSession,
    NoFileSystem,
    PathMissing,
    PointFiles,
    check_dest,
)

__all__ = [
    "DestExists",
    "Drive",
    "EncryptedVolume",
    "FileRestoreError",
    "GuestSession",
    "NoFileSystem",
    "PathMissing",
    "PointFiles",
    "check_dest",
]
