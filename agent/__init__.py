"""Capture: sources that yield a machine's disk to the archive, and continuous protection.

- ``orchestrator.sources.open_source(SOURCE)``: image files and block devices (read and hashed), LVM volumes
  (from a snapshot, ``lvm``), running QEMU guests (``qmp``: dirty bitmaps, fleecing over NBD) and
  libvirt domains (``virt``: checkpoints and pull-mode backups). ``SOURCES.md`` says what each
  guarantees and when an incremental falls back to a full read.
- ``plan``: the protocol between a change-tracking source and ``Archive.backup``
  (prepare -> backup -> commit, or abort) and ``capture()``.
- ``protect``: the loop behind ``lifeboat protect``, its JSON status and Prometheus metrics.
- ``nbd``: the small NBD client that reads the frozen views and their dirty bitmaps.
"""
