"""The block archive: content-addressed chunks in packs, point manifests, retention, verify.

Entry point: ``Archive`` (``archive.store``). The on-disk format is in ``archive/FORMAT.md``.
"""

from archive.errors import LifeboatError
from archive.points import PointInfo
from archive.store import Archive, BlockSource, PointReader

__all__ = ["Archive", "BlockSource", "LifeboatError", "PointInfo", "PointReader"]
