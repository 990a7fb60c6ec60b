"""moto's server as the tests run it (``python tests/moto_aws.py -H HOST -p PORT``): moto 5.2's
EBS direct APIs answer a block size of 512 bytes where AWS answers 512 KiB; the size AWS documents
is set here, so a 256 MiB disk is some thirty ``PutSnapshotBlock`` calls instead of thirty thousand.
The drivers use whatever block size the API answers (tests/targets/test_aws.py also runs them on
moto's own 512 bytes, in process)."""

from moto.ebs import models
from moto.server import main

AWS_BLOCK_SIZE = 512 * 1024
_init = models.EBSSnapshot.__init__


def _init_aws_size(self: models.EBSSnapshot, *args: object, **kwargs: object) -> None:
    _init(self, *args, **kwargs)  # type: ignore[arg-type]
    self.block_size = AWS_BLOCK_SIZE


models.EBSSnapshot.__init__ = _init_aws_size  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
