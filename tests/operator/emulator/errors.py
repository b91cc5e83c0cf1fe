"""API errors: every failure leaves the server as a `Status` object, shaped like the apiserver's."""

from __future__ import annotations

from tests.operator.emulator.resources import ResourceType

_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
    422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A Kubernetes API failure; `status()` is the `Status` body the apiserver would send."""

    def __init__(self, code: int, message: str, *, reason: str | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def _gr_details(rtype: ResourceType, name: str) -> dict:
    details = {"name": name, "kind": rtype.plural}
    if rtype.group:
        details["group"] = rtype.group
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rtype.qualified} "{name}" not found', details=_gr_details(rtype, name))


def already_exists(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(409, f'{rtype.qualified} "{name}" already exists', reason="AlreadyExists",
                    details=_gr_details(rtype, name))


def conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(409, f'Operation cannot be fulfilled on {rtype.qualified} "{name}": {why}',
                    details=_gr_details(rtype, name))


def invalid(rtype: ResourceType, name: str, errors: list[str]) -> ApiError:
    """422 Invalid, as `apierrors.NewInvalid` words it.

    Each error is "field.path: what is wrong" (the apiserver's own format); the part before the
    first ": " becomes the cause's `field` when it contains no spaces.
    """
    causes = []
    for error in errors:
        field, sep, rest = error.partition(": ")
        if sep and " " not in field:
            causes.append({"reason": "FieldValueInvalid", "message": rest, "field": field})
        else:
            causes.append({"reason": "FieldValueInvalid", "message": error})
    summary = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    details = {"name": name, "kind": rtype.kind, "causes": causes}
    if rtype.group:
        details["group"] = rtype.group
    return ApiError(422, f'{rtype.qualified_kind} "{name}" is invalid: {summary}', details=details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)
