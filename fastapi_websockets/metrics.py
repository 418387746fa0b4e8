"""Prometheus metrics for channel layers and consumers (the ``metrics`` extra).

Call :func:`instrument` once, then expose the registry as usual::

    from fastapi_websockets.metrics import instrument
    instrument()
    app.mount("/metrics", prometheus_client.make_asgi_app())

No label ever holds a channel or group name: consumers are labelled by class
name, layers by backend name, handled events by their ``type`` only when the
consumer has a handler for it (``other`` otherwise), so the number of series
is fixed by the code, not by the traffic.

Counters the layers keep anyway (drops in ``layer.stats``, the broker
connection state of :class:`~fastapi_websockets.backends.broker.BrokerChannelLayer`)
are read at scrape time by a collector over the live layers and cost nothing
between scrapes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from time import perf_counter
from typing import Any, cast

from starlette.websockets import WebSocketDisconnect

from fastapi_websockets import observing
from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.backends.broker import BrokerChannelLayer, ConnectionStats
from fastapi_websockets.consumers import AsyncWebSocketConsumer
from fastapi_websockets.mailboxes import MailboxStats
from fastapi_websockets.types import Message

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastapi_websockets.metrics needs prometheus-client, which is not installed; "
        'install it with: pip install "fastapi-websockets[metrics]"'
    ) from exc

__all__ = ["instrument"]

#: Buckets for everything measured here: sub-millisecond local work up to broker outages.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_PREFIX = "fastapi_websockets_"
_DROPPED_FIELDS = tuple(field.name for field in dataclasses.fields(MailboxStats))


def _reason(field: str) -> str:
    return field.removeprefix("dropped_")


Key = tuple[str, ...]


class _Series:
    """One metric's values by label values, kept as plain numbers.

    prometheus-client's metric objects take a lock on every update, which
    costs more than the rest of delivering a message to one receiver; these
    are plain dict and list updates, read by :class:`_MetricsCollector` at
    scrape time (a scrape copies each dict in one step, so a scrape from
    another thread never sees one being resized).
    """

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.kind = kind
        self.name = _PREFIX + name
        self.doc = doc
        self.labels = labels
        self.values: dict[Key, float] = {}

    def add(self, key: Key, amount: float = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + amount

    def family(self) -> Metric:
        family_class = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        name = self.name.removesuffix("_total")
        family = family_class(name, self.doc, labels=self.labels)
        for key, value in sorted(list(self.values.items())):
            family.add_metric(list(key), value)
        return family


class _Histogram:
    """One histogram's bucket counts (not cumulative) and sum, by label values."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name = _PREFIX + name
        self.doc = doc
        self.labels = labels
        self.series: dict[Key, tuple[list[int], list[float]]] = {}

    def observe(self, key: Key, value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = ([0] * (len(BUCKETS) + 1), [0.0])
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is "<=").
        series[0][bisect_left(BUCKETS, value)] += 1
        series[1][0] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, (counts, total) in sorted(list(self.series.items())):
            cumulative, buckets = 0, []
            for bound, count in zip((*map(floatToGoString, BUCKETS), "+Inf"), list(counts), strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(key), buckets, total[0])
        return family


class _Metrics(observing.Observer):
    """The metrics of one registry, fed by the hooks."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.open = _Series("gauge", "open_connections", "WebSocket connections open now.", ("consumer",))
        self.connections = _Series(
            "counter",
            "connections_total",
            "WebSocket handshakes, accepted or rejected.",
            ("consumer", "outcome"),
        )
        self.disconnections = _Series(
            "counter",
            "disconnections_total",
            "Accepted connections that ended, by close code.",
            ("consumer", "code"),
        )
        self.frames = _Series(
            "counter", "frames_total", "WebSocket frames from and to clients.", ("consumer", "direction")
        )
        self.handler_duration = _Histogram(
            "handler_duration_seconds",
            "Time consumers spent handling channel events (event: the type, or 'other' without a handler).",
            ("consumer", "event"),
        )
        self.handler_errors = _Series(
            "counter", "handler_errors_total", "Channel-event handlers that raised.", ("consumer", "event")
        )
        self.layer_messages = _Series(
            "counter",
            "layer_messages_total",
            "Messages sent, group-sent and received through channel layers.",
            ("backend", "operation"),
        )
        self.group_send_duration = _Histogram(
            "layer_group_send_duration_seconds", "Time a group_send call took.", ("backend",)
        )
        self.delivery_lag = _Histogram(
            "layer_delivery_lag_seconds",
            "Time from a sender's send or group_send to the message's arrival in this process.",
            ("backend",),
        )
        registry.register(_MetricsCollector(self))
        registry.register(_LayerCollector())

    def families(self) -> list[Metric]:
        """Every metric fed by the hooks, as of now."""
        return [
            metric.family()
            for metric in (
                self.open,
                self.connections,
                self.disconnections,
                self.frames,
                self.handler_duration,
                self.handler_errors,
                self.layer_messages,
                self.group_send_duration,
                self.delivery_lag,
            )
        ]

    # ---------------------------------------------------------------- layers

    def message_out(self, layer: BaseChannelLayer, operation: str, meta: dict[str, Any]) -> object:
        meta["ts"] = time.time()
        return (layer.backend_name, operation, time.perf_counter())

    def message_out_done(self, token: object, error: BaseException | None) -> None:
        if error is not None:
            return
        backend, operation, started = cast("tuple[str, str, float]", token)
        self.layer_messages.add((backend, operation))
        if operation == "group_send":
            self.group_send_duration.observe((backend,), time.perf_counter() - started)

    def message_in(self, layer: BaseChannelLayer, meta: Mapping[str, Any]) -> None:
        sent = meta.get("ts")
        if isinstance(sent, (int, float)):
            # Wall clocks of two hosts may disagree slightly; a negative lag is clock skew.
            self.delivery_lag.observe((layer.backend_name,), max(time.time() - sent, 0.0))

    def message_received(self, layer: BaseChannelLayer) -> None:
        self.layer_messages.add((layer.backend_name, "receive"))

    # ------------------------------------------------------------- consumers

    def connection_accepted(self, consumer: AsyncWebSocketConsumer) -> None:
        name = type(consumer).__name__
        self.connections.add((name, "accepted"))
        self.open.add((name,))

    def connection_ended(self, consumer: AsyncWebSocketConsumer, accepted: bool, code: int | None) -> None:
        name = type(consumer).__name__
        if accepted:
            self.open.add((name,), -1)
            self.disconnections.add((name, str(code) if code is not None else "none"))
        else:
            self.connections.add((name, "rejected"))

    def frame_in(self, consumer: AsyncWebSocketConsumer) -> object:
        self.frames.add((type(consumer).__name__, "received"))
        return None

    def frame_out(self, consumer: AsyncWebSocketConsumer) -> None:
        self.frames.add((type(consumer).__name__, "sent"))

    def event_in(self, consumer: AsyncWebSocketConsumer, event: str, message: Message) -> object:
        return (type(consumer).__name__, event), perf_counter()

    # The token is what event_in returned. Typed as such rather than cast: this runs once
    # per handled event per receiver, and cast() is a function call.
    def event_in_done(self, token: tuple[Key, float], error: BaseException | None) -> None:  # type: ignore[override]
        key, started = token
        if error is None:
            self.handler_duration.observe(key, perf_counter() - started)
        elif isinstance(error, Exception):
            self.handler_duration.observe(key, perf_counter() - started)
            # A client that left while its handler wrote to it is not a handler failure.
            if not isinstance(error, WebSocketDisconnect):
                self.handler_errors.add(key)


class _MetricsCollector(Collector):
    """Exposes the hook-fed metrics of one :class:`_Metrics`."""

    def __init__(self, metrics: _Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.families()


class _LayerCollector(Collector):
    """Reads drops and broker connection state from the live layers at scrape time.

    A layer that is garbage collected leaves its final counts behind, so the
    counters never go down.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: weakref.WeakSet[BaseChannelLayer] = weakref.WeakSet()
        self._retired_drops: Tally[tuple[str, str]] = Tally()
        self._retired_reconnections: Tally[str] = Tally()

    def _watch(self, layer: BaseChannelLayer) -> None:
        if layer in self._watched:
            return
        self._watched.add(layer)
        connection = layer.connection if isinstance(layer, BrokerChannelLayer) else None
        weakref.finalize(layer, self._retire, layer.backend_name, layer.stats, connection)

    def _retire(self, backend: str, stats: MailboxStats, connection: ConnectionStats | None) -> None:
        with self._lock:
            for field in _DROPPED_FIELDS:
                self._retired_drops[backend, _reason(field)] += getattr(stats, field)
            if connection is not None:
                self._retired_reconnections[backend] += connection.reconnections

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        layers = list(observing.live_layers)
        with self._lock:
            drops = Tally(self._retired_drops)
            reconnections = Tally(self._retired_reconnections)
        up: dict[str, int] = {}
        for layer in layers:
            self._watch(layer)
            backend = layer.backend_name
            for field in _DROPPED_FIELDS:
                drops[backend, _reason(field)] += getattr(layer.stats, field)
            if isinstance(layer, BrokerChannelLayer):
                reconnections[backend] += layer.connection.reconnections
                state = None if layer.closed else layer.connection.up
            else:
                reconnections[backend] += 0
                # A layer without a broker is connected for as long as it is open.
                state = None if layer.closed else True
            if state is not None:
                # Several layers of one backend: up only while all of them are.
                up[backend] = min(up.get(backend, 1), int(state))
        return self._families(drops, reconnections, up)

    @staticmethod
    def _families(
        drops: Mapping[tuple[str, str], int] | None = None,
        reconnections: Mapping[str, int] | None = None,
        up: Mapping[str, int] | None = None,
    ) -> list[Metric]:
        dropped = CounterMetricFamily(
            _PREFIX + "layer_dropped",
            "Messages a layer dropped, by reason (full mailbox, expired, undecodable).",
            labels=["backend", "reason"],
        )
        for (backend, reason), value in sorted((drops or {}).items()):
            dropped.add_metric([backend, reason], value)
        reconnected = CounterMetricFamily(
            _PREFIX + "layer_reconnections",
            "Times a layer's broker connection came back after being lost.",
            labels=["backend"],
        )
        for backend, value in sorted((reconnections or {}).items()):
            reconnected.add_metric([backend], value)
        connected = GaugeMetricFamily(
            _PREFIX + "layer_up",
            "1 while the layer is connected to its broker, 0 while it is not.",
            labels=["backend"],
        )
        for backend, value in sorted((up or {}).items()):
            connected.add_metric([backend], value)
        return [dropped, reconnected, connected]


_installed: dict[int, _Metrics] = {}
_install_lock = threading.Lock()


def instrument(registry: CollectorRegistry | None = None) -> None:
    """Turn on Prometheus metrics for every layer and consumer in this process.

    Registers the ``fastapi_websockets_*`` metrics in ``registry`` (default:
    prometheus-client's global registry) and installs the hooks that feed
    them. Idempotent: calling it again with the same registry does nothing.
    Layers created before the call are covered too.
    """
    target = REGISTRY if registry is None else registry
    with _install_lock:
        if id(target) in _installed:
            return
        metrics = _Metrics(target)
        _installed[id(target)] = metrics
        observing.install(metrics)
