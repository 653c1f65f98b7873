"""CRC-64/XZ (the ECMA-182 CRC that OSS returns as x-oss-hash-crc64ecma), computed natively."""

from __future__ import annotations

import anycrc

_MODEL = anycrc.Model("CRC64-XZ")


def crc64(data: bytes, init: int = 0) -> int:
    """CRC of `data`, continuing from the CRC `init` of the bytes before it."""
    return _MODEL.calc(data, init) if init else _MODEL.calc(data)


def combine(crc1: int, crc2: int, len2: int) -> int:
    return _MODEL.combine(crc1, crc2, len2)


def combine_parts(parts: list[tuple[int, int]]) -> int:
    """Whole-object CRC from (crc64, size) of consecutive parts."""
    total = 0
    for crc, size in parts:
        total = combine(total, crc, size) if size else total
    return total
