"""Exceptions shared by the emulator modules."""


class OSSError(Exception):
    """An OSS error reply: HTTP status, Code, Message, optional EC and extra elements."""

    def __init__(self, status, code, message, ec=None, extra=None, headers=None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.ec = ec
        self.extra = extra or {}
        self.headers = headers or {}


class StsError(Exception):
    """An RPC (STS) error reply, rendered as the Alibaba JSON error shape."""

    def __init__(self, status, code, message):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ConnectionAbort(Exception):
    """Drop the connection without sending a response (reset fault, broken body)."""
