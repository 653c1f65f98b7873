"""XML and date formatting exactly as oss2 parses it (no namespace, `.000Z` times, RFC1123 GMT)."""

import base64
import email.utils
import time
from urllib.parse import quote
from xml.sax.saxutils import escape

XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'


def http_date(ts):
    """'Sat, 05 Dec 2015 11:10:29 GMT'."""
    return email.utils.formatdate(int(ts), usegmt=True)


def iso8601(ts):
    """'2015-12-05T11:10:29.000Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(int(ts)))


def text(value):
    return escape(str(value))


def maybe_url(value, url_encoded):
    """Percent-encode (never '+') for encoding-type=url, else XML-escape."""
    return quote(value, safe="") if url_encoded else text(value)


def element(tag, value):
    return f"<{tag}>{text(value)}</{tag}>"


def document(root, body):
    return (XML_DECL + f"<{root}>" + "".join(body) + f"</{root}>").encode("utf-8")


def error_body(code, message, request_id, host_id, ec=None, extra=None):
    parts = [element("Code", code), element("Message", message),
             element("RequestId", request_id), element("HostId", host_id)]
    for k, v in (extra or {}).items():
        parts.append(element(k, v))
    if ec:
        parts.append(element("EC", ec))
    return document("Error", parts)


def error_header(body):
    """Value of `x-oss-err` for HEAD responses (base64 of the error XML)."""
    return base64.b64encode(body).decode("ascii")


def bool_text(b):
    return "true" if b else "false"
