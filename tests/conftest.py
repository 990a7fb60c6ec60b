from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_guest_image() -> Path:
    """The cached sample guest disk image (examples/sample_guest.py), built on first use.

    Shared by the whole session: never boot or modify it in place, work on a copy
    (``examples.sample_guest.copy_image``) or boot it with QEMU's ``-snapshot``.
    """
    from examples.sample_guest import build

    return build()
