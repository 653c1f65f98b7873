"""Pure planning: simple vs multipart, part size, part ranges."""

from __future__ import annotations

from dataclasses import dataclass

from ossyncd.config import MAX_PART_SIZE, MIN_PART_SIZE, UploadConfig
from ossyncd.errors import PlanError

__all__ = ["PlanError", "PartRange", "choose_part_size", "is_multipart", "part_ranges"]


@dataclass(frozen=True)
class PartRange:
    number: int
    offset: int
    size: int


def is_multipart(size: int, cfg: UploadConfig) -> bool:
    return size > 0 and size >= cfg.multipart_threshold


def choose_part_size(size: int, cfg: UploadConfig) -> int:
    """The configured size, or 'auto': the preferred size doubled until the file fits in
    max_parts parts (like oss2.determine_part_size), within OSS's 100 KiB..5 GiB."""
    if cfg.part_size is not None:
        part = cfg.part_size
    else:
        part = max(cfg.preferred_part_size, MIN_PART_SIZE)
        while part * cfg.max_parts < size and part < MAX_PART_SIZE:
            part *= 2
        part = min(part, MAX_PART_SIZE)
    if -(-size // part) > cfg.max_parts:
        raise PlanError(f"{size} bytes need more than {cfg.max_parts} parts of {part} bytes; "
                         f"raise upload.part_size or use part_size = \"auto\"")
    return part


def part_ranges(size: int, part_size: int) -> list[PartRange]:
    return [PartRange(i + 1, off, min(part_size, size - off)) for i, off in enumerate(range(0, size, part_size))]
