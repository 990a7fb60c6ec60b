"""lifeboat: a hypervisor-agnostic disaster-recovery orchestrator.

The project is laid out in top-level folders (``archive/``, ``agent/``, ``exporters/``,
``nbdserver/``, ``targets/``, ``orchestrator/``, ``plumbing/``); this package gathers them under one
import name (each is a symbolic link here, copied into the wheel), so that an install puts only
``lifeboat`` into site-packages. Code imports ``lifeboat.archive``, ``lifeboat.targets``, ….
"""
