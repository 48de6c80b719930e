"""The client of the aggregator: registration, the round's task, the update."""

from __future__ import annotations

from fedbpt_wire.federation import (
    GlobalState,
    RegisterRequest,
    RegisterResponse,
    RoundTask,
    RunStatus,
    UpdateRequest,
    UpdateResponse,
)

from .http import RetryingClient


class AggregatorClient:
    def __init__(self, url: str, **http_options):
        self.http = RetryingClient(url, **http_options)

    def register(self, client_id: str, num_samples: int, enroll_key: str | None = None) -> RegisterResponse:
        if enroll_key:
            self.http.set_token(enroll_key)
        body = RegisterRequest(client_id=client_id, num_samples=num_samples).model_dump()
        response = RegisterResponse.model_validate(self.http.request("POST", "/v1/clients", body))
        self.http.set_token(response.token)
        return response

    def round(self) -> RoundTask:
        return RoundTask.model_validate(self.http.request("GET", "/v1/round"))

    def submit(self, update: UpdateRequest) -> UpdateResponse:
        return UpdateResponse.model_validate(self.http.request("POST", "/v1/round/update", update.model_dump()))

    def global_state(self) -> GlobalState:
        return GlobalState.model_validate(self.http.request("GET", "/v1/global"))

    def status(self) -> RunStatus:
        return RunStatus.model_validate(self.http.request("GET", "/v1/status"))

    def close(self) -> None:
        self.http.close()
