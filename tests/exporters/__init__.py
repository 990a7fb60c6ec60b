"""Tests of the exporters: the exporter conformance matrix, size limits, imports, reader fuzzing,
the export command, and booting exported images."""
