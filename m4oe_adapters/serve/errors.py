"""Errors of the service, each with the HTTP status it is answered with (4xx: the client's request; 503: busy).

Library errors that reach the service are mapped by :func:`http_status`: a bad image or adapter file is the
client's (400), an adapter made for another backbone is unprocessable (422).
"""
from __future__ import annotations

from ..errors import AdapterFormatError, BackboneMismatchError, ConfigError, DataError, M4oEError


class ServiceError(M4oEError):
    """A request the service refuses; ``status`` is the HTTP status code of the answer."""

    status = 400


class PayloadTooLarge(ServiceError):
    """The body is over the byte limit, or the image over the pixel limit."""

    status = 413


class UnsupportedMediaType(ServiceError):
    """The upload is not an image format the service reads."""

    status = 415


class UnknownModality(ServiceError):
    """No loaded adapter fits: the named modality is not loaded, or the router found none."""

    status = 422


class RoutingUnavailable(ServiceError):
    """No modality was given and no served adapter has a routing signature."""

    status = 422


class AdapterConflict(ServiceError):
    """Adding a modality that is already loaded (use replace), or removing one that is not."""

    status = 409


class AdapterNotFound(ServiceError):
    status = 404


class Busy(ServiceError):
    """Too many requests in flight; retry later."""

    status = 503


def http_status(error: M4oEError) -> int:
    """The HTTP status a library or service error is answered with."""
    if isinstance(error, ServiceError):
        return error.status
    if isinstance(error, BackboneMismatchError):
        return 422
    if isinstance(error, (AdapterFormatError, DataError, ConfigError)):
        return 400
    return 400
