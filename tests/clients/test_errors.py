"""Error mapping: every status class, the error body, the request id, bodies that are not the service's."""

from __future__ import annotations

import httpx
import pytest
from icm_lora_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ICMLoraError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ResponseValidationError,
    ServiceUnavailableError,
)

from tests.clients.mock import Recorder, error


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (422, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, PayloadTooLargeError),
        (429, RateLimitError),
        (500, InternalServerError),
        (502, InternalServerError),
        (503, ServiceUnavailableError),
        (405, APIStatusError),
        (418, APIStatusError),
    ],
)
def test_status_maps_to_its_class(status: int, cls: type[APIStatusError]) -> None:
    recorder = Recorder(error(status, "the_type", "the message", **{"x-request-id": "req-42"}))
    with recorder.client(max_retries=0) as client, pytest.raises(cls) as caught:
        client.get_task("t1")
    exc = caught.value
    assert type(exc) is cls
    assert isinstance(exc, APIStatusError) and isinstance(exc, ICMLoraError)
    assert exc.status_code == status
    assert exc.type == "the_type" and exc.message == "the message"
    assert exc.request_id == "req-42"
    assert exc.body == {"error": {"type": "the_type", "message": "the message"}}
    assert str(exc) == f"{status} the_type: the message, request id req-42"


def test_503_is_an_internal_server_error_and_carries_retry_after() -> None:
    recorder = Recorder(error(503, "unavailable", "store down", **{"retry-after": "7"}))
    with recorder.client(max_retries=0) as client, pytest.raises(InternalServerError) as caught:
        client.health()
    assert isinstance(caught.value, ServiceUnavailableError)
    assert caught.value.retry_after == 7.0
    assert caught.value.request_id is None  # the service sets no request id header


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(502, text="<html><body>Bad gateway</body></html>"), "<html><body>Bad gateway</body></html>"),
        (httpx.Response(500, content=b""), "Internal Server Error"),
        (httpx.Response(404, json=["not", "a", "dict"]), "Not Found"),
        (httpx.Response(409, json={"error": "just a string"}), "Conflict"),
        (httpx.Response(400, json={"error": {"type": 5, "message": None}}), "Bad Request"),
        (httpx.Response(422, json={"detail": "fastapi style"}), "fastapi style"),
    ],
)
def test_malformed_error_bodies_still_map(response: httpx.Response, message: str) -> None:
    recorder = Recorder(response)
    with recorder.client(max_retries=0) as client, pytest.raises(APIStatusError) as caught:
        client.get_task("t1")
    assert caught.value.status_code == response.status_code
    assert caught.value.message == message
    assert caught.value.type is None


def test_request_id_header_variants() -> None:
    recorder = Recorder(error(404, **{"request-id": "abc"}))
    with recorder.client() as client, pytest.raises(NotFoundError) as caught:
        client.get_task("t1")
    assert caught.value.request_id == "abc"


def test_transport_errors_map_to_connection_errors() -> None:
    with Recorder(httpx.ConnectError("refused")).client(max_retries=0) as client:
        with pytest.raises(APIConnectionError) as caught:
            client.health()
        assert not isinstance(caught.value, APITimeoutError)
        assert "refused" in caught.value.message
    with Recorder(httpx.ReadTimeout("slow")).client(max_retries=0) as client, pytest.raises(APITimeoutError):
        client.health()


def test_unexpected_success_body_is_a_validation_error() -> None:
    recorder = Recorder(httpx.Response(200, json={"status": ["not", "a", "string"]}))
    with recorder.client() as client, pytest.raises(ResponseValidationError) as caught:
        client.health()
    assert "Health" in caught.value.message
