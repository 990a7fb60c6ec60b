"""``python -m orchestrator`` is the ``lifeboat`` command."""

from orchestrator.cli import main

main()
