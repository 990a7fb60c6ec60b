from tests.targets.realpeers import sample_archive  # noqa: F401  (shared fixture)
