"""The UI's login check: one user and password, compared in constant time, with failures slowed down and a lockout
after repeated ones, so a password cannot be guessed at network speed."""

from __future__ import annotations

import hmac
import threading
import time
from collections import deque
from collections.abc import Callable


class Login:
    """Gradio's `auth` callable. Each failure costs `delay` seconds; after `max_failures` failures within `window`
    seconds every attempt is refused (the right password too) until the window has passed."""

    def __init__(self, user: str, password: str, max_failures: int = 5, window: float = 60.0, delay: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self._user, self._password = user.encode(), password.encode()
        self.max_failures, self.window, self.delay = max_failures, window, delay
        self._clock, self._sleep = clock, sleep
        self._failures: deque[float] = deque()
        self._lock = threading.Lock()

    def locked(self) -> bool:
        with self._lock:
            now = self._clock()
            while self._failures and now - self._failures[0] >= self.window:
                self._failures.popleft()
            return len(self._failures) >= self.max_failures

    def __call__(self, username: str, password: str) -> bool:
        if self.locked():
            self._sleep(self.delay)
            return False
        ok = hmac.compare_digest(str(username).encode(), self._user) & \
            hmac.compare_digest(str(password).encode(), self._password)
        if not ok:
            with self._lock:
                self._failures.append(self._clock())
            self._sleep(self.delay)
        return ok
