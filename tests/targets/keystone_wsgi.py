"""Serve Keystone's public WSGI application on loopback (run by Debian's /usr/bin/python3, where
python3-keystone lives, not by the test venv): ``python3 keystone_wsgi.py PORT``, the
configuration in ``OS_KEYSTONE_CONFIG_FILES``. A threaded ``wsgiref`` server: the tests need a
few concurrent requests (Glance's auth_token middleware validates while a client waits), not
Apache. Prints ``ready`` once listening."""

import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass


def main() -> None:
    port = int(sys.argv[1])
    sys.argv = sys.argv[:1]  # keystone parses the command line with oslo.config
    from keystone.server.wsgi import initialize_public_application

    server = make_server("127.0.0.1", port, initialize_public_application(), Server, QuietHandler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
