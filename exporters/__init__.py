"""Disk-image formats: writers that stream an archive point out, readers that import images."""
