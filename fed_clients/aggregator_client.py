"""The client of the aggregator: a partition claim, registration, the round's task, the update."""

from __future__ import annotations

from fedbpt_wire.federation import (
    GlobalState,
    PartitionAssignment,
    PartitionClaim,
    RegisterRequest,
    RegisterResponse,
    RoundTask,
    RunStatus,
    UpdateRequest,
    UpdateResponse,
)

from .http import RequestFailed, RetryingClient


class AggregatorClient:
    def __init__(self, url: str, **http_options):
        self.http = RetryingClient(url, **http_options)

    def claim_partition(self, instance: str, parts: int, enroll_key: str | None = None) -> PartitionAssignment:
        """Part K of `parts` for `instance`: the same K each time the same instance asks."""
        body = PartitionClaim(instance=instance, parts=parts).model_dump()
        # The enroll key authorizes this request only: a client token already set must outlive it; without
        # an enroll key the claim goes unauthenticated (an open aggregator), not under the client's token.
        previous = self.http.token
        self.http.set_token(None)
        try:
            response = self.http.request("POST", "/v1/partitions/claim", body, token=enroll_key)
        finally:
            self.http.set_token(previous)
        return PartitionAssignment.model_validate(response)

    def register(
        self, client_id: str, num_samples: int, enroll_key: str | None = None, token: str | None = None
    ) -> RegisterResponse:
        """Registers `client_id`, or re-binds it with its own earlier `token` (a restarted client).

        A token the aggregator no longer knows (a new run, a new database) falls back to the enroll key;
        an id registered under another token is refused (409): only its holder or the operator re-binds it.
        """
        body = RegisterRequest(client_id=client_id, num_samples=num_samples).model_dump()
        if token:
            self.http.set_token(token)
            try:
                response = RegisterResponse.model_validate(self.http.request("POST", "/v1/clients", body))
            except RequestFailed as exc:
                if exc.status != 401:
                    raise
            else:
                self.http.set_token(response.token)
                return response
            self.http.set_token(None)
        if enroll_key:
            self.http.set_token(enroll_key)
        response = RegisterResponse.model_validate(self.http.request("POST", "/v1/clients", body))
        self.http.set_token(response.token)
        return response

    def round(self, wait: float = 0.0) -> RoundTask:
        """This client's task; with `wait`, the aggregator holds the answer until there is work or the run
        moves on (an aggregator without long polls answers at once, and the caller's own backoff applies)."""
        path = f"/v1/round?wait={wait:g}" if wait else "/v1/round"
        return RoundTask.model_validate(self.http.request("GET", path))

    def submit(self, update: UpdateRequest) -> UpdateResponse:
        return UpdateResponse.model_validate(self.http.request("POST", "/v1/round/update", update.model_dump()))

    def global_state(self) -> GlobalState:
        return GlobalState.model_validate(self.http.request("GET", "/v1/global"))

    def status(self) -> RunStatus:
        return RunStatus.model_validate(self.http.request("GET", "/v1/status"))

    def close(self) -> None:
        self.http.close()
