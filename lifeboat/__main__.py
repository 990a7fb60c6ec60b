"""``python -m lifeboat`` is the ``lifeboat`` command."""

from lifeboat.orchestrator.cli import main

main()
