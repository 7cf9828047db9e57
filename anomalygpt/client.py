"""A small Python client for `anomalygpt serve` (httpx): what a camera gateway or a MES script would call.

Errors come back as ServiceError carrying the HTTP status and the service's one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx


class ServiceError(RuntimeError):
    """The service refused a request; `status` is the HTTP status, the message its one-line error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    """Calls the service at base_url; `http` lets a caller pass its own httpx.Client (e.g. starlette's TestClient)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        api_key: str | None = None,
        timeout: float = 120.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, url, headers=self.headers, **kwargs)
        if response.status_code >= 400:
            raise ServiceError(response.status_code, error_text(response))
        return response

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz").json()

    def create_profile(
        self, name: str, paths: Sequence[str | Path], false_alarm_rate: float | None = None
    ) -> dict[str, Any]:
        """Fit a profile from good image files (`false_alarm_rate` as fit's --false-alarm-rate); returns it with its
        `id`, `version` and `false_alarm_rate` (None when its references are too few for a stated rate)."""
        files = [("images", (Path(p).name, Path(p).read_bytes())) for p in paths]
        data = {"name": name} | ({} if false_alarm_rate is None else {"false_alarm_rate": str(false_alarm_rate)})
        return self.request("POST", "/v1/profiles", data=data, files=files).json()

    def profiles(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/profiles").json()["items"]

    def profile(self, profile_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/profiles/{profile_id}").json()

    def inspect(self, profile_id: str, path: str | Path, sensitivity: float | None = None) -> dict[str, Any]:
        """Inspect one image file against a profile; the answer has the inspection's `id` and `overlay_url`."""
        files = [("image", (Path(path).name, Path(path).read_bytes()))]
        return self.request("POST", "/v1/inspect", data=form(profile_id, sensitivity), files=files).json()

    def inspect_batch(
        self, profile_id: str, paths: Sequence[str | Path], sensitivity: float | None = None
    ) -> list[dict[str, Any]]:
        files = [("images", (Path(p).name, Path(p).read_bytes())) for p in paths]
        return self.request("POST", "/v1/inspect/batch", data=form(profile_id, sensitivity), files=files).json()[
            "items"
        ]

    def inspection(self, inspection_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/inspections/{inspection_id}").json()

    def inspections(self, **filters: Any) -> dict[str, Any]:
        """{"items": [...], "total": N}; filters: profile, since (ISO time), verdict, limit, offset."""
        params = {key: value for key, value in filters.items() if value is not None}
        return self.request("GET", "/v1/inspections", params=params).json()

    def chat(self, inspection_id: str, question: str, on_piece: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Ask about an inspection; the answer streams in as server-sent events (each text piece to `on_piece`).
        Returns the recorded answer: {"id", "inspection", "question", "answer", "answerer", "checks", ...}."""
        body = {"inspection": inspection_id, "question": question}
        with self.http.stream("POST", "/v1/chat", json=body, headers=self.headers) as response:
            if response.status_code >= 400:
                response.read()
                raise ServiceError(response.status_code, error_text(response))
            for event, data in server_events(response.iter_lines()):
                if event == "piece" and on_piece is not None:
                    on_piece(data["text"])
                elif event == "done":
                    return data
                elif event == "error":
                    raise ServiceError(response.status_code, data["error"])
        raise ServiceError(response.status_code, "the answer stream ended without its 'done' event")

    def overlay(self, inspection_id: str) -> bytes:
        return self.request("GET", f"/v1/inspections/{inspection_id}/overlay").content

    def anomaly_map(self, inspection_id: str) -> bytes:
        """The map as .npy bytes (numpy.load(io.BytesIO(...)))."""
        return self.request("GET", f"/v1/inspections/{inspection_id}/map").content


def form(profile_id: str, sensitivity: float | None) -> dict[str, str]:
    data = {"profile": profile_id}
    if sensitivity is not None:
        data["sensitivity"] = repr(float(sensitivity))
    return data


def server_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each server-sent event."""
    event = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:200]
