from tests.targets.realpeers import libvirtd, sample_archive  # noqa: F401  (shared fixtures)
