"""One log line per refused request (a 4xx), with its reason, at the default log level: a front end often
shows only "Bad Request", so the server's log is where a user finds out which field was refused. Rate
limited, so a client that retries in a loop cannot flood the log: past `burst` lines in `window_s`, lines
are counted and the count is logged with the next line that gets through."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("fitllm")


@dataclass
class RefusalLog:
    """Rate-limited warnings for refused requests."""

    burst: int = 20
    window_s: float = 60.0
    _window_start: float = 0.0
    _logged: int = 0
    _suppressed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refused(self, status: int, method: str, path: str, message: str) -> bool:
        """Log `status` for `method path` with its reason, unless over the rate; returns whether logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self.window_s:
                self._window_start, self._logged = now, 0
            if self._logged >= self.burst:
                self._suppressed += 1
                return False
            self._logged += 1
            suppressed, self._suppressed = self._suppressed, 0
        more = f" ({suppressed} more refused requests were not logged)" if suppressed else ""
        log.warning("refused %s %s with %d: %s%s", method, path, status, " ".join(message.split()), more)
        return True


REFUSALS = RefusalLog()  # the process's: one server per process
