"""Capture: sources that yield a machine's disk to the archive (image files, block devices)."""
