"""The ``lifeboat`` command line, the runbook engine, the scheduler and reports."""
