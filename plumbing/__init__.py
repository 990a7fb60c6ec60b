"""Plumbing at the bottom of lifeboat's dependency graph: it imports nothing else of lifeboat, so
every package may use it, and each piece of it exists once.

- ``errors``: the error base (``LifeboatError``, exit status 1; ``UsageError``, exit status 2).
- ``nbd``: the NBD wire format (magics, options, commands, replies, flags, layouts) and
  ``NbdUrl`` (``nbd://HOST:PORT/EXPORT`` built and parsed).
- ``qmp``: the QMP client for QEMU's monitor.
- ``tls``: server and client ``ssl.SSLContext``s (the optional CA of a server checks clients).
- ``listen``: the ``HOST:PORT`` grammar of ``--listen``.
- ``proc``: processes found again by pid and token, stopped, and their log's tail.
"""
