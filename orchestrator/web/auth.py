"""Who may see the pane: a bearer token for the API, a session cookie for the pages, CSRF tokens on
every form that changes something, and two roles.

Each token has a role: an operator's may act (start a rehearsal, a failover, a teardown), a
viewer's may see everything and act on nothing. The tokens are the secrets; they are never put in a
page, a URL or a log. Logging in with one creates
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
OPERATOR = "operator"
VIEWER = "viewer"


class Auth:
    """The tokens and their roles, the open sessions and the CSRF key of one server process."""

    def __init__(self, operator_token: str, viewer_token: str | None, secure_cookies: bool) -> None:
        self._tokens = [(operator_token.encode(), OPERATOR)]
        if viewer_token is not None:
            self._tokens.append((viewer_token.encode(), VIEWER))
        self._sessions: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._csrf_key = secrets.token_bytes(32)
        self.secure_cookies = secure_cookies

    def token_role(self, given: str) -> str | None:
        """The role of token ``given`` (compared in constant time with each), or None."""
        found = None
        for token, role in self._tokens:
            if hmac.compare_digest(given.encode(), token):
                found = role
        return found

    def bearer_role(self, request: Request) -> str | None:
        """The role of the request's ``Authorization: Bearer TOKEN``, if any."""
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return self.token_role(value.strip()) if scheme.lower() == "bearer" else None

    def session_role(self, request: Request) -> str | None:
        """The role of the request's live session cookie, if any."""
        sid = request.cookies.get(SESSION_COOKIE, "")
        with self._lock:
            expires, role = self._sessions.get(sid, (0.0, None))
            if role is not None and expires < time.time():
                del self._sessions[sid]
                role = None
        return role

    def role(self, request: Request) -> str | None:
        """The API accepts the bearer token or the pages' session (the pages' htmx calls)."""
        return self.bearer_role(request) or self.session_role(request)

    def open_session(self, response: Response, role: str) -> None:
        """Start a session of ``role`` and set its cookie on ``response``."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = (time.time() + SESSION_SECONDS, role)
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
