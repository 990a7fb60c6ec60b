"""Typed errors of the archive, on the one hierarchy of ``lifeboat.plumbing.errors``: each class
carries its exit status, so the CLI needs no mapping."""

from lifeboat.plumbing.errors import LifeboatError, UsageError


class ArchiveNotFound(UsageError):
    """No archive at the location given."""


class ArchiveExists(UsageError):
    """``archive init`` on a location that already holds an archive."""


class WrongKey(UsageError):
    """The key file does not open this archive, or an encrypted archive was opened without one."""


class BadSelector(UsageError):
    """A ``MACHINE@WHEN`` selector that is malformed or matches no point."""


class SourceError(UsageError):
    """The backup source cannot be opened or read."""


class DestinationError(UsageError):
    """The restore or export destination cannot be written as asked."""


class FormatError(LifeboatError):
    """An archive file is not in the documented format (see ``archive/FORMAT.md``)."""


class CorruptChunk(LifeboatError):
    """A chunk's content does not match its id, or it cannot be decoded."""


class MissingChunk(LifeboatError):
    """A point refers to a chunk that no pack holds."""


class StorageError(LifeboatError):
    """The storage backend failed (disk full, I/O error, permission)."""


class Locked(LifeboatError):
    """Another process holds a lock that this operation needs."""
