"""Service metrics in the Prometheus text format (0.0.4), kept in memory by one process.

Written here rather than with prometheus-client: five metric families do not justify a dependency, and the
format is a few lines of text.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


def label_text(**labels: str) -> str:
    """{a="x",b="y"} with the format's escapes (backslash, quote, newline)."""
    escaped = {k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{key}="{value}"' for key, value in escaped.items()) + "}"


class Metrics:
    """Request counts by route and status, a latency histogram by route, verdicts, batches and auth refusals."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self.queue_depth = queue_depth
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, route, status)
        self.buckets: Counter[tuple[str, int]] = Counter()  # (route, bucket index): non-cumulative counts
        self.latency_sum: dict[str, float] = {}
        self.latency_count: Counter[str] = Counter()
        self.verdicts: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.auth_failures = 0

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        index = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
        with self.lock:
            self.requests[(method, route, status)] += 1
            self.buckets[(route, index)] += 1
            self.latency_sum[route] = self.latency_sum.get(route, 0.0) + seconds
            self.latency_count[route] += 1

    def observe_verdict(self, verdict: str) -> None:
        with self.lock:
            self.verdicts[verdict] += 1

    def observe_batch(self, size: int) -> None:
        with self.lock:
            self.batch_sizes[size] += 1

    def observe_auth_failure(self) -> None:
        with self.lock:
            self.auth_failures += 1

    def text(self) -> str:
        with self.lock:
            lines = self.request_lines() + self.latency_lines() + self.other_lines()
        return "\n".join(lines) + "\n"

    def request_lines(self) -> list[str]:
        lines = [
            "# HELP anomalygpt_requests_total HTTP requests by route and status.",
            "# TYPE anomalygpt_requests_total counter",
        ]
        for (method, route, status), count in sorted(self.requests.items()):
            lines.append(
                f"anomalygpt_requests_total{label_text(method=method, route=route, status=str(status))} {count}"
            )
        return lines

    def latency_lines(self) -> list[str]:
        name = "anomalygpt_request_seconds"
        lines = [f"# HELP {name} Request latency in seconds.", f"# TYPE {name} histogram"]
        for route in sorted(self.latency_count):
            cumulative = 0
            for index, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
                cumulative += self.buckets[(route, index)]
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f"{name}_bucket{label_text(route=route, le=le)} {cumulative}")
            lines.append(f"{name}_sum{label_text(route=route)} {self.latency_sum[route]:.6f}")
            lines.append(f"{name}_count{label_text(route=route)} {self.latency_count[route]}")
        return lines

    def other_lines(self) -> list[str]:
        lines = [
            "# HELP anomalygpt_queue_depth Images waiting for or in inference.",
            "# TYPE anomalygpt_queue_depth gauge",
            f"anomalygpt_queue_depth {self.queue_depth()}",
            "# HELP anomalygpt_verdicts_total Acknowledged inspections by verdict.",
            "# TYPE anomalygpt_verdicts_total counter",
        ]
        for verdict in ("normal", "anomalous"):
            lines.append(f"anomalygpt_verdicts_total{label_text(verdict=verdict)} {self.verdicts[verdict]}")
        lines += [
            "# HELP anomalygpt_batches_total Inference batches by size.",
            "# TYPE anomalygpt_batches_total counter",
        ]
        for size, count in sorted(self.batch_sizes.items()):
            lines.append(f"anomalygpt_batches_total{label_text(size=str(size))} {count}")
        lines += [
            "# HELP anomalygpt_auth_failures_total Requests refused for a missing or wrong API key.",
            "# TYPE anomalygpt_auth_failures_total counter",
            f"anomalygpt_auth_failures_total {self.auth_failures}",
        ]
        return lines
