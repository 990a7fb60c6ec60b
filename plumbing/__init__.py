"""Plumbing at the bottom of lifeboat's dependency graph: wire formats, TLS, listen addresses,
process helpers and the error base. It imports nothing else of lifeboat, so every package may use it.
"""
