"""The one place that maps fleet errors to gRPC status codes.

Trailing metadata tells a client what to do next:

=========================  ==========================================  ===============================
key                        sent with                                   meaning
=========================  ==========================================  ===============================
``fleet-last-acked-seq``   FAILED_PRECONDITION (sequence gap)          resume after this seq
``fleet-retry-after-s``    RESOURCE_EXHAUSTED, UNAVAILABLE             wait this long before retrying
``fleet-bad-step-seq``     INVALID_ARGUMENT, when one step is to blame  the step to quarantine
=========================  ==========================================  ===============================

:class:`MalformedRequests` parses every request itself so that bytes that are not
the expected protobuf get INVALID_ARGUMENT (gRPC answers UNKNOWN when its own
deserializer raises).
"""

from __future__ import annotations

import functools
import inspect
import logging
from contextvars import ContextVar

import grpc
from google.protobuf.message import DecodeError

from fleet import metrics
from fleet.errors import BackendUnavailable, FleetError, InvalidInput, Overloaded, SequenceGap

log = logging.getLogger(__name__)

REQUEST_BYTES: ContextVar[int] = ContextVar("request_bytes", default=0)
"""Wire size of the request the current RPC's handler received last: set by :class:`MalformedRequests` as it
parses each one (a context variable: each RPC runs in its own task, and a stream's messages are parsed in it)."""


def request_bytes(msg) -> int:
    """Serialized size of ``msg``, the request just received: its wire size when :class:`MalformedRequests`
    parsed it, else computed. Protobuf's ``ByteSize`` encodes the whole message to count it (0.2-1 ms for a
    4-chunk low-dim message of ~425 kB), so the wire size saves that per message."""
    return REQUEST_BYTES.get() or msg.ByteSize()


def status_for(exc: FleetError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code)


def trailing_metadata_for(exc: FleetError) -> tuple[tuple[str, str], ...]:
    if isinstance(exc, SequenceGap):
        return (("fleet-last-acked-seq", str(exc.last_acked_seq)),)
    if isinstance(exc, (Overloaded, BackendUnavailable)):
        return (("fleet-retry-after-s", f"{exc.retry_after_s:.3f}"),)
    if isinstance(exc, InvalidInput) and exc.step_seq is not None:
        return (("fleet-bad-step-seq", str(exc.step_seq)),)
    return ()


async def abort(context: grpc.aio.ServicerContext, exc: FleetError, on_error=None) -> None:
    code = status_for(exc)
    if on_error is not None:
        on_error(code)
    context.set_trailing_metadata(trailing_metadata_for(exc))
    await context.abort(code, str(exc))


def map_errors(on_error=None):
    """Decorate a servicer method (unary or streaming) so FleetErrors become statuses.

    ``on_error(code)`` is called for each mapped error (metrics).
    """

    def wrap(method):
        if inspect.isasyncgenfunction(method):
            @functools.wraps(method)
            async def gen(self, request, context):
                try:
                    async for item in method(self, request, context):
                        yield item
                except FleetError as exc:
                    log.info("%s -> %s: %s", method.__name__, exc.grpc_code, exc)
                    await abort(context, exc, on_error)
            return gen

        @functools.wraps(method)
        async def unary(self, request, context):
            try:
                return await method(self, request, context)
            except FleetError as exc:
                log.info("%s -> %s: %s", method.__name__, exc.grpc_code, exc)
                await abort(context, exc, on_error)
        return unary

    return wrap


def _parse(deserializer, raw: bytes, method: str):
    REQUEST_BYTES.set(len(raw))
    try:
        return deserializer(raw)
    except (DecodeError, ValueError) as exc:
        raise InvalidInput(f"{method}: request is not a valid protobuf message ({len(raw)} bytes): {exc}") from None


async def _parsed_stream(request_iterator, deserializer, method: str):
    async for raw in request_iterator:
        yield _parse(deserializer, raw, method)


_count_rejection = metrics.count_gateway_rejection


async def _result(value):
    """A handler's return value, whether it was a coroutine or a plain function."""
    return await value if inspect.isawaitable(value) else value


async def _responses(value):
    """A streaming handler's responses: an async generator, or a coroutine writing with context.write."""
    if inspect.isasyncgen(value):
        async for response in value:
            yield response
    elif hasattr(value, "__iter__"):
        for response in value:
            yield response
    else:
        await _result(value)


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Outermost interceptor: parse requests here; bytes that do not parse -> INVALID_ARGUMENT.

    ``on_error(code)`` counts the rejections (metrics). For a streaming request the
    error surfaces in the servicer's ``async for``, where ``map_errors`` maps it."""

    def __init__(self, on_error=None):
        self._on_error = on_error or _count_rejection

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method
        out = handler.response_serializer
        if handler.request_streaming:
            inner_stream = handler.stream_stream if handler.response_streaming else handler.stream_unary
            if handler.response_streaming:
                async def stream_stream(request_iterator, context):
                    async for response in _responses(inner_stream(_parsed_stream(request_iterator, parse, method),
                                                                  context)):
                        yield response
                return grpc.stream_stream_rpc_method_handler(stream_stream, None, out)

            async def stream_unary(request_iterator, context):
                return await _result(inner_stream(_parsed_stream(request_iterator, parse, method), context))
            return grpc.stream_unary_rpc_method_handler(stream_unary, None, out)

        on_error = self._on_error
        if handler.response_streaming:
            inner_unary_stream = handler.unary_stream

            async def unary_stream(raw, context):
                try:
                    request = _parse(parse, raw, method)
                except InvalidInput as exc:
                    await abort(context, exc, on_error)
                async for response in _responses(inner_unary_stream(request, context)):
                    yield response
            return grpc.unary_stream_rpc_method_handler(unary_stream, None, out)

        inner_unary = handler.unary_unary

        async def unary_unary(raw, context):
            try:
                request = _parse(parse, raw, method)
            except InvalidInput as exc:
                await abort(context, exc, on_error)
            return await _result(inner_unary(request, context))
        return grpc.unary_unary_rpc_method_handler(unary_unary, None, out)
