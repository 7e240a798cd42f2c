"""The daemon's Prometheus endpoint (``ckptd serve --metrics-port P``), with ``prometheus-client``.

What is exported (every name starts ``ckptd_``):

- ``stall_seconds`` (summary): the ``save_async`` stall each rank reported with its part (its staging
  copy plus the save's one collective);
- ``bytes_staged_total``: bytes handed over in staged parts; ``bytes_written_total``: bytes written to
  checkpoint files, counted per write chunk, so it moves during a save;
- ``commits_total``, ``commit_latency_seconds`` (histogram, from the first part's hand-off to the rename),
  ``last_commit_throughput_bytes_per_second``;
- ``aborts_total{cause}``: ``cause`` sorts the abort's reason into ``deadline``, ``write_error``,
  ``rank`` (a rank gave up or asked), ``peer`` (another node or the leader), ``refused`` (the commit
  checks), ``shutdown``, ``ownership`` (the output dir's lease) or ``other``;
- ``transactions_in_flight{state}``;
- ``slab_bytes``: bytes of the ranks' staging slabs the daemon holds mapped now (memfd shared memory: it
  counts in ``Shmem`` of ``/proc/meminfo``, and has no name in /dev/shm).

Counters and the latency histogram are updated by the daemon's event loop as things happen; the gauges are
read from the daemon's state at each scrape (a collector), so a scrape never waits for the loop.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class MetricsUnavailable(RuntimeError):
    """prometheus-client is not installed; the text says how to install it."""


class AbortCause(str, enum.Enum):
    DEADLINE = "deadline"
    WRITE_ERROR = "write_error"
    RANK = "rank"
    PEER = "peer"
    REFUSED = "refused"
    SHUTDOWN = "shutdown"
    OWNERSHIP = "ownership"
    OTHER = "other"


# First match wins: the daemon's abort reasons, by the words they are written with (server.py).
_CAUSES: list[tuple[re.Pattern[str], AbortCause]] = [
    (re.compile(r"asked to stop|grace .* ran out|shutting down"), AbortCause.SHUTDOWN),
    (re.compile(r"lease|new job writes|belongs to job"), AbortCause.OWNERSHIP),
    (re.compile(r"writing failed|No space|ENOSPC|EIO|Input/output error|Read-only"), AbortCause.WRITE_ERROR),
    (re.compile(r"deadline|within the timeout|timed out"), AbortCause.DEADLINE),
    (re.compile(r"leader|node\(s\)|^node \d+|went silent|shared temp dir"), AbortCause.PEER),
    (re.compile(r"refuses to commit|not a valid|disagrees"), AbortCause.REFUSED),
    (re.compile(r"rank|gave up|veto|gone"), AbortCause.RANK),
]


def abort_cause(reason: str | None) -> AbortCause:
    """The cause an abort's reason text names.

    Example:
        >>> abort_cause("rank 1: writing failed: [Errno 28] No space left on device").value
        'write_error'
    """
    text = reason or ""
    for pattern, cause in _CAUSES:
        if pattern.search(text):
            return cause
    return AbortCause.OTHER


@dataclass(frozen=True)
class LiveState:
    """What a scrape reads from the daemon (``Daemon.metrics_state``)."""

    bytes_staged: int
    bytes_written: int
    in_flight: dict[str, int]  # state -> transactions
    slab_bytes: int
    last_commit_throughput: float | None


class ByteCounter:
    """A byte count that the daemon's writer threads add to, chunk by chunk."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._value += n

    @property
    def value(self) -> int:
        with self._lock:
            return self._value


class DaemonMetrics:
    """The metrics of one daemon and the HTTP endpoint that serves them.

    Args:
        live: called at each scrape (from the HTTP thread) for the daemon's current state.

    Example:
        >>> m = DaemonMetrics(lambda: LiveState(0, 0, {}, 0, None))  # doctest: +SKIP
        >>> m.serve(9464)  # doctest: +SKIP
    """

    def __init__(self, live: Callable[[], LiveState]) -> None:
        try:
            import prometheus_client as prom
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        except ImportError:
            raise MetricsUnavailable(
                "--metrics-port needs prometheus-client, which is not installed: pip install 'ckptd[metrics]' "
                "(or pip install prometheus-client)"
            ) from None
        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.stall = prom.Summary(
            "ckptd_stall_seconds",
            "save_async stall reported by each rank (staging copy and collective)",
            registry=self.registry,
        )
        self.commits = prom.Counter("ckptd_commits", "committed saves", registry=self.registry)
        self.latency = prom.Histogram(
            "ckptd_commit_latency_seconds",
            "from a save's first hand-off to its commit",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.aborts = prom.Counter("ckptd_aborts", "aborted saves, by cause", ["cause"], registry=self.registry)
        for cause in AbortCause:
            self.aborts.labels(cause.value)  # every cause shows, at 0, from the start
        self._live = live
        self._counter_family = CounterMetricFamily
        self._gauge_family = GaugeMetricFamily
        self.registry.register(self)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def describe(self) -> list[Any]:
        return []  # the live families are produced at collect time only

    def collect(self) -> Iterator[Any]:
        """Prometheus' collector protocol: the gauges and byte counters, read from the daemon now."""
        state = self._live()
        c = self._counter_family("ckptd_bytes_staged", "bytes handed over in staged parts")
        c.add_metric([], state.bytes_staged)
        yield c
        c = self._counter_family("ckptd_bytes_written", "bytes written to checkpoint files (per chunk)")
        c.add_metric([], state.bytes_written)
        yield c
        g = self._gauge_family("ckptd_transactions_in_flight", "live transactions, by state", labels=["state"])
        for name, n in sorted(state.in_flight.items()):
            g.add_metric([name], n)
        yield g
        g = self._gauge_family("ckptd_slab_bytes", "bytes of ranks' staging slabs the daemon holds mapped")
        g.add_metric([], state.slab_bytes)
        yield g
        g = self._gauge_family(
            "ckptd_last_commit_throughput_bytes_per_second", "bytes of the last commit over its latency"
        )
        g.add_metric([], state.last_commit_throughput or 0.0)
        yield g

    def observe_abort(self, reason: str | None) -> None:
        self.aborts.labels(abort_cause(reason).value).inc()

    def observe_commit(self, latency_s: float) -> None:
        self.commits.inc()
        self.latency.observe(latency_s)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (a daemon thread); returns the port (``port`` 0: the one the OS chose).

        Raises:
            OSError: the port cannot be bound (in use, or privileged).
        """
        self._server, self._thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        logger.info("metrics at http://%s:%d/metrics", host, self.port)
        return self.port

    def url(self, host: str) -> str:
        """Where a scraper reaches it (an IPv6 host in brackets; a wildcard host as the loopback)."""
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
