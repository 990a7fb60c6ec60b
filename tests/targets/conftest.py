from tests.targets.pxeserver import ipmi_bmc, pxe_server  # noqa: F401  (shared fixtures)
from tests.targets.realpeers import sample_archive  # noqa: F401  (shared fixture)
