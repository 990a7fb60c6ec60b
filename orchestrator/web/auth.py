"""Who may see the pane: a bearer token for the API, a session cookie for the pages, CSRF tokens on
every form that changes something.

The token is the one secret; it is never put in a page, a URL or a log. Logging in with it creates
a random session id kept in memory (a restart logs everyone out) and sent back as an HttpOnly,
SameSite=Strict cookie. Forms carry an HMAC of a per-browser CSRF cookie (double submit): a page of
another site can neither read it nor make the browser send the Strict cookies.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

from fastapi import Request
from starlette.responses import Response

SESSION_COOKIE = "lifeboat_session"
CSRF_COOKIE = "lifeboat_csrf"
SESSION_SECONDS = 12 * 3600


class Auth:
    """The token, the open sessions and the CSRF key of one server process."""

    def __init__(self, token: str, secure_cookies: bool) -> None:
        self._token = token.encode()
        self._sessions: dict[str, float] = {}
        self._lock = threading.Lock()
        self._csrf_key = secrets.token_bytes(32)
        self.secure_cookies = secure_cookies

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the token (in constant time)."""
        return hmac.compare_digest(given.encode(), self._token)

    def bearer_ok(self, request: Request) -> bool:
        """Whether the request carries ``Authorization: Bearer TOKEN``."""
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def session_ok(self, request: Request) -> bool:
        """Whether the request carries a live session cookie."""
        sid = request.cookies.get(SESSION_COOKIE, "")
        with self._lock:
            expires = self._sessions.get(sid)
            if expires is not None and expires < time.time():
                del self._sessions[sid]
                expires = None
        return expires is not None

    def allowed(self, request: Request) -> bool:
        """The API accepts the bearer token or the pages' session (the pages' htmx calls)."""
        return self.bearer_ok(request) or self.session_ok(request)

    def open_session(self, response: Response) -> None:
        """Start a session and set its cookie on ``response``."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = time.time() + SESSION_SECONDS
        self._set(response, SESSION_COOKIE, sid, SESSION_SECONDS)

    def close_session(self, request: Request, response: Response) -> None:
        """End the request's session, if any, and clear its cookie."""
        with self._lock:
            self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=self.secure_cookies, httponly=True,
                               samesite="strict")

    def csrf_seed(self, request: Request) -> tuple[str, bool]:
        """The browser's CSRF cookie value, and whether it is new (then ``remember_csrf`` must set it)."""
        seed = request.cookies.get(CSRF_COOKIE, "")
        return (seed, False) if len(seed) >= 32 else (secrets.token_urlsafe(32), True)

    def remember_csrf(self, response: Response, seed: str) -> None:
        """Set the CSRF cookie (for the browser's lifetime)."""
        self._set(response, CSRF_COOKIE, seed, None)

    def csrf_token(self, seed: str) -> str:
        """The value a form carries for this browser."""
        return hmac.new(self._csrf_key, seed.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, request: Request, given: str) -> bool:
        """Whether a submitted form's CSRF value belongs to this browser's cookie."""
        seed = request.cookies.get(CSRF_COOKIE, "")
        return bool(seed) and hmac.compare_digest(given, self.csrf_token(seed))

    def _set(self, response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", secure=self.secure_cookies, httponly=True,
                            samesite="strict")
