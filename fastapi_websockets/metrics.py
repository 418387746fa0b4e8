"""Prometheus metrics for channel layers and consumers (the ``metrics`` extra).

Call :func:`instrument` once, then expose the registry as usual::

    from fastapi_websockets.metrics import instrument
    instrument()
    app.mount("/metrics", prometheus_client.make_asgi_app())

No label ever holds a channel or group name: consumers are labelled by class
name, layers by backend name, handled events by their ``type`` only when the
consumer has a handler for it (``other`` otherwise), so the number of series
is fixed by the code, not by the traffic.

Counters the layers keep anyway (receives and drops in ``layer.stats``, the
broker connection state of :class:`~fastapi_websockets.backends.broker.BrokerChannelLayer`)
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
_DROPPED_FIELDS = tuple(
    field.name for field in dataclasses.fields(MailboxStats) if field.name.startswith("dropped_")
)


def _reason(field: str) -> str:
    return field.removeprefix("dropped_")


Key = tuple[str, ...]


def _count(values: dict[Any, int], key: Any) -> None:
    values[key] = values.get(key, 0) + 1


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

    def family(self, extra: Mapping[Key, float] | None = None) -> Metric:
        """The metric as of now, plus the ``extra`` values (summed with any of the same labels)."""
        values = Tally(dict(self.values))
        values.update(extra or {})
        return _family(self.kind, self.name, self.doc, self.labels, values)


def _family(kind: str, name: str, doc: str, labels: tuple[str, ...], values: Mapping[Key, float]) -> Metric:
    family_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    family = family_class(name.removesuffix("_total"), doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class _Buckets:
    """One histogram series: bucket counts (not cumulative, the last one above every bound) and sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # A value equal to a bound belongs to that bound's bucket (le is "<="): bisect_left.
        self.counts[0 if value <= _FIRST_BOUND else bisect_left(BUCKETS, value)] += 1
        self.total += value


_FIRST_BOUND = BUCKETS[0]


class _Handling(_Buckets):
    """The handler durations and errors of one consumer class and event type."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        super().__init__()
        self.errors = 0


def _histogram_family(
    name: str, doc: str, labels: tuple[str, ...], series: Iterable[tuple[Key, _Buckets]]
) -> Metric:
    """A histogram family of ``series``; series with the same labels are summed."""
    merged: dict[Key, tuple[list[int], float]] = {}
    for key, buckets in series:
        counts, total = list(buckets.counts), buckets.total
        if key in merged:
            before, before_total = merged[key]
            counts = [a + b for a, b in zip(before, counts, strict=True)]
            total += before_total
        merged[key] = counts, total
    family = HistogramMetricFamily(_PREFIX + name, doc, labels=labels)
    for key, (counts, total) in sorted(merged.items()):
        cumulative, cumulated = 0, []
        for bound, count in zip(_BOUNDS, counts, strict=True):
            cumulative += count
            cumulated.append((bound, cumulative))
        family.add_metric(list(key), cumulated, total)
    return family


_BOUNDS = (*map(floatToGoString, BUCKETS), "+Inf")


class _Metrics(observing.Observer):
    """The metrics of one registry, fed by the hooks.

    The series updated once per receiver (handled events, frames sent) are
    keyed by the consumer's class rather than by label values, so that an
    update builds no label tuple and makes no call; class names are looked up
    at scrape time (two classes of one name share a series, as labels must).
    """

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
        self.frames_received: dict[type[AsyncWebSocketConsumer], int] = {}
        self.frames_sent: dict[type[AsyncWebSocketConsumer], int] = {}
        self.handling: dict[tuple[type[AsyncWebSocketConsumer], str], _Handling] = {}
        self.layer_messages = _Series(
            "counter",
            "layer_messages_total",
            "Messages sent, group-sent and received through channel layers.",
            ("backend", "operation"),
        )
        self.group_send_duration: dict[str, _Buckets] = {}
        self.delivery_lag: dict[str, _Buckets] = {}
        self.layers = _LayerCollector()
        for layer in list(observing.live_layers):
            self.layers.watch(layer)
        registry.register(_MetricsCollector(self))
        registry.register(self.layers)

    def families(self) -> list[Metric]:
        """Every metric fed by the hooks, as of now."""
        frames = Tally[Key]()
        for direction, counts in (("received", self.frames_received), ("sent", self.frames_sent)):
            for cls, count in list(counts.items()):
                frames[cls.__name__, direction] += count
        handling = [((cls.__name__, event), series) for (cls, event), series in list(self.handling.items())]
        errors = Tally[Key]()
        for key, series in handling:
            if series.errors:
                errors[key] += series.errors
        received: dict[Key, float] = {
            (backend, "receive"): count for backend, count in self.layers.received().items()
        }
        by_backend = ("backend",)
        return [
            self.open.family(),
            self.connections.family(),
            self.disconnections.family(),
            _family(
                "counter",
                _PREFIX + "frames_total",
                "WebSocket frames from and to clients.",
                ("consumer", "direction"),
                frames,
            ),
            _histogram_family(
                "handler_duration_seconds",
                "Time consumers spent handling channel events "
                "(event: the type, or 'other' without a handler).",
                ("consumer", "event"),
                handling,
            ),
            _family(
                "counter",
                _PREFIX + "handler_errors_total",
                "Channel-event handlers that raised.",
                ("consumer", "event"),
                errors,
            ),
            self.layer_messages.family(received),
            _histogram_family(
                "layer_group_send_duration_seconds",
                "Time a group_send call took.",
                by_backend,
                (((backend,), series) for backend, series in list(self.group_send_duration.items())),
            ),
            _histogram_family(
                "layer_delivery_lag_seconds",
                "Time from a sender's send or group_send to the message's arrival in this process.",
                by_backend,
                (((backend,), series) for backend, series in list(self.delivery_lag.items())),
            ),
        ]

    # ---------------------------------------------------------------- layers

    def layer_created(self, layer: BaseChannelLayer) -> None:
        self.layers.watch(layer)

    def message_out(self, layer: BaseChannelLayer, operation: str, meta: dict[str, Any]) -> object:
        meta["ts"] = time.time()
        return (layer.backend_name, operation, time.perf_counter())

    def message_out_done(self, token: object, error: BaseException | None) -> None:
        if error is not None:
            return
        backend, operation, started = cast("tuple[str, str, float]", token)
        self.layer_messages.add((backend, operation))
        if operation == "group_send":
            _series(self.group_send_duration, backend).observe(time.perf_counter() - started)

    def message_in(self, layer: BaseChannelLayer, meta: Mapping[str, Any]) -> None:
        sent = meta.get("ts")
        if isinstance(sent, (int, float)):
            # Wall clocks of two hosts may disagree slightly; a negative lag is clock skew.
            _series(self.delivery_lag, layer.backend_name).observe(max(time.time() - sent, 0.0))

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
        _count(self.frames_received, type(consumer))
        return None

    def frame_out(self, consumer: AsyncWebSocketConsumer) -> None:
        # Once per frame per socket: inlined rather than a call to _count.
        sent = self.frames_sent
        cls = type(consumer)
        sent[cls] = sent.get(cls, 0) + 1

    def event_in(self, consumer: AsyncWebSocketConsumer, event: str, message: Message) -> object:
        try:
            return self.handling[type(consumer), event], perf_counter()
        except KeyError:
            # Bounded: event is a type the class has a handler for, or "other".
            series = self.handling[type(consumer), event] = _Handling()
            return series, perf_counter()

    # The token is what event_in returned. Typed as such rather than cast: this runs once
    # per handled event per receiver, and cast() is a function call; so is observe(),
    # which is inlined here.
    def event_in_done(self, token: tuple[_Handling, float], error: BaseException | None) -> None:  # type: ignore[override]
        series, started = token
        elapsed = perf_counter() - started
        if error is None:
            series.counts[0 if elapsed <= _FIRST_BOUND else bisect_left(BUCKETS, elapsed)] += 1
            series.total += elapsed
        elif isinstance(error, Exception):
            series.observe(elapsed)
            # A client that left while its handler wrote to it is not a handler failure.
            if not isinstance(error, WebSocketDisconnect):
                series.errors += 1


def _series(histograms: dict[str, _Buckets], backend: str) -> _Buckets:
    series = histograms.get(backend)
    if series is None:
        series = histograms[backend] = _Buckets()
    return series


class _MetricsCollector(Collector):
    """Exposes the hook-fed metrics of one :class:`_Metrics`."""

    def __init__(self, metrics: _Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.families()


class _LayerCollector(Collector):
    """Reads drops, receives and broker connection state from the live layers at scrape time.

    Layers are watched from their creation (or from :func:`instrument`, for
    older ones), so a layer garbage collected between two scrapes leaves its
    final counts behind and the counters never go down.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: weakref.WeakSet[BaseChannelLayer] = weakref.WeakSet()
        # Appended to by weakref finalizers, which run wherever a collection happens, also
        # while this collector holds its lock: so they take no lock, and scrapes fold it in.
        self._retiring: list[tuple[str, MailboxStats, ConnectionStats | None]] = []
        self._retired_drops: Tally[tuple[str, str]] = Tally()
        self._retired_received: Tally[str] = Tally()
        self._retired_reconnections: Tally[str] = Tally()

    def watch(self, layer: BaseChannelLayer) -> None:
        """Count ``layer`` from now on, and after it is garbage collected."""
        with self._lock:
            if layer in self._watched:
                return
            self._watched.add(layer)
        connection = layer.connection if isinstance(layer, BrokerChannelLayer) else None
        weakref.finalize(layer, self._retiring.append, (layer.backend_name, layer.stats, connection))

    def _fold_retired(self) -> None:
        # Under self._lock: finalizers only ever append, so popping until empty is safe.
        while self._retiring:
            backend, stats, connection = self._retiring.pop()
            for field in _DROPPED_FIELDS:
                self._retired_drops[backend, _reason(field)] += getattr(stats, field)
            self._retired_received[backend] += stats.received
            if connection is not None:
                self._retired_reconnections[backend] += connection.reconnections

    def received(self) -> Tally[str]:
        """Messages received through the watched layers, by backend, as of now."""
        with self._lock:
            self._fold_retired()
            received = Tally(self._retired_received)
            layers = list(self._watched)
        for layer in layers:
            received[layer.backend_name] += layer.stats.received
        return received

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            self._fold_retired()
            drops = Tally(self._retired_drops)
            reconnections = Tally(self._retired_reconnections)
            layers = list(self._watched)
        up: dict[str, int] = {}
        for layer in layers:
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
            "Messages a layer dropped, by reason (full mailbox, expired, undecodable, released).",
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
