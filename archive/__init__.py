"""The block archive: content-addressed chunks in packs, point manifests, retention, verify.

Entry point: ``Archive`` (``archive.store``). The on-disk format is in ``archive/FORMAT.md``.
"""

from lifeboat.archive.points import PointInfo
from lifeboat.archive.store import Archive, BlockSource, PointReader
from lifeboat.plumbing.errors import LifeboatError

__all__ = ["Archive", "BlockSource", "LifeboatError", "PointInfo", "PointReader"]
