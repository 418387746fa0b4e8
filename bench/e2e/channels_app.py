"""Django Channels 4.3 with channels_redis (core or PubSub layer), served as ASGI by uvicorn.

The layer is chosen by ``E2E_CHANNELS_LAYER`` (``core`` or ``pubsub``). Settings live
in this module so that the app is one file; a project would keep them in settings.py.
"""

from __future__ import annotations

import os
from typing import Any

import django
from django.conf import settings
from payload import ROOM, message, redis_url

_LAYERS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-e2e",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["channels"],
    CHANNEL_LAYERS={
        "default": {
            "BACKEND": _LAYERS[os.environ.get("E2E_CHANNELS_LAYER", "core")],
            "CONFIG": {"hosts": [redis_url()]},
        }
    },
)
django.setup()

from channels.generic.websocket import AsyncJsonWebsocketConsumer  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


class RoomConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        await self.channel_layer.group_add(ROOM, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(ROOM, self.channel_name)

    async def bench_message(self, event: dict[str, Any]) -> None:
        await self.send_json(event["body"])


@csrf_exempt
async def publish(request: HttpRequest) -> JsonResponse:
    seq = int(request.GET["seq"])
    await get_channel_layer().group_send(ROOM, {"type": "bench.message", "body": message(seq)})
    return JsonResponse({"status": "sent"})


urlpatterns = [path("broadcast", publish)]

app = ProtocolTypeRouter(
    {
        "http": get_asgi_application(),
        "websocket": URLRouter([path("ws", RoomConsumer.as_asgi())]),
    }
)
