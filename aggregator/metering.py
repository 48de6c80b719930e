"""Measures the aggregator<->client link: the body bytes of every client request and response.

Counted by the aggregator itself, not reported by clients, so the communication numbers of a run
cannot drift from what actually crossed the wire (4xx answers included: they crossed it too).
"""

from __future__ import annotations

import asyncio

CLIENT_PATHS = frozenset({"/v1/clients", "/v1/partitions/claim", "/v1/round", "/v1/round/update", "/v1/global"})


class TrafficMeter:
    """ASGI middleware charging each client request to the round open when it arrived.

    The count is stored before the response's last chunk is sent, so a client that reads
    `/v1/status` right after its own request sees that request counted.
    """

    def __init__(self, app, coordinator):
        self.app = app
        self.coordinator = coordinator

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in CLIENT_PATHS:
            return await self.app(scope, receive, send)
        if scope["path"] == "/v1/global" and self._is_operator(scope):
            # The operator watching a run (a bench, a dashboard) is not a client: its reads would otherwise
            # be billed to the federation, at whatever rate it polls.
            return await self.app(scope, receive, send)
        round_ = self.coordinator.accounting_round()
        up = down = 0

        async def counting_receive():
            nonlocal up
            message = await receive()
            if message["type"] == "http.request":
                up += len(message.get("body", b""))
            return message

        async def counting_send(message):
            nonlocal down
            if message["type"] == "http.response.body":
                down += len(message.get("body", b""))
                if not message.get("more_body", False):
                    await asyncio.to_thread(self.coordinator.add_traffic, round_, up, down)
            await send(message)

        await self.app(scope, counting_receive, counting_send)

    def _is_operator(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return self.coordinator.auth.is_operator(value.decode("latin-1"))
        return False
