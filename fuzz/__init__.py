"""Coverage-guided fuzz targets for lifeboat's parsers of untrusted bytes (not installed, like
``bench/``). One module per target, ``fuzz_NAME.py``, defining ``test_one_input(data: bytes)``,
which returns normally or raises only lifeboat's typed errors (it catches ``LifeboatError``
itself); its seed corpus is ``corpus/NAME/``. ``python -m fuzz.run`` runs them under atheris."""
