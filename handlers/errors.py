"""Exceptions a handler raises to give a request a specific status."""

from __future__ import annotations

__all__ = ["PredictionException", "InvalidInput"]


class PredictionException(Exception):
    """TorchServe's ``ts.utils.util.PredictionException``: the request gets ``error_code``."""

    def __init__(self, message: str, error_code: int = 500):
        self.message = message
        self.error_code = error_code
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} : {self.error_code}"


class InvalidInput(PredictionException):
    """The request's input is wrong: answered 400 with this message (a BadRequestException; a
    handler's own PredictionException is answered with TorchServe's InternalServerException)."""

    client_error = True

    def __init__(self, message: str):
        super().__init__(message, 400)
