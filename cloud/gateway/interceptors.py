"""The one place that maps fleet errors to gRPC status codes."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from fleet.errors import FleetError, Overloaded, SequenceGap

log = logging.getLogger(__name__)


def status_for(exc: FleetError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code)


def trailing_metadata_for(exc: FleetError) -> tuple[tuple[str, str], ...]:
    if isinstance(exc, SequenceGap):
        return (("fleet-last-acked-seq", str(exc.last_acked_seq)),)
    if isinstance(exc, Overloaded):
        return (("fleet-retry-after-s", f"{exc.retry_after_s:.3f}"),)
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
