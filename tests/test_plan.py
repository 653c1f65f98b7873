"""Planning: simple vs multipart and part sizes within OSS's limits."""

import pytest

from ossyncd.config import UploadConfig
from ossyncd.crc import combine_parts, crc64
from ossyncd.plan import PlanError, choose_part_size, is_multipart, part_ranges

MiB = 1024**2


def test_threshold_boundaries():
    cfg = UploadConfig(multipart_threshold="8MiB")
    assert not is_multipart(0, cfg)
    assert not is_multipart(8 * MiB - 1, cfg)
    assert is_multipart(8 * MiB, cfg)
    assert is_multipart(8 * MiB + 1, cfg)


@pytest.mark.parametrize("size", [1, 100 * 1024, 80 * 1024**3, 200 * 1024**3, 48 * 1024**4])
def test_auto_part_size_keeps_within_limits(size):
    cfg = UploadConfig()
    part = choose_part_size(size, cfg)
    assert 100 * 1024 <= part <= 5 * 1024**3
    assert -(-size // part) <= 10_000


def test_auto_part_size_grows_only_when_needed():
    cfg = UploadConfig(preferred_part_size="8MiB")
    assert choose_part_size(10 * 1024**3, cfg) == 8 * MiB          # 1280 parts
    assert choose_part_size(100 * 1024**3, cfg) == 16 * MiB        # 80 GiB+ needs doubling


def test_configured_part_size_that_needs_too_many_parts_is_an_error():
    cfg = UploadConfig(part_size="100KiB")
    with pytest.raises(PlanError, match="10000 parts"):
        choose_part_size(2 * 1024**3, cfg)


def test_ranges_cover_file_exactly():
    ranges = part_ranges(3 * MiB + 1, MiB)
    assert [r.number for r in ranges] == [1, 2, 3, 4]
    assert ranges[-1].size == 1 and ranges[-1].offset == 3 * MiB
    assert sum(r.size for r in ranges) == 3 * MiB + 1


def test_crc_known_values_and_combination():
    assert crc64(b"123456789") == 0x995DC9BBDF1939FA
    assert crc64(b"hello") == 11177612005948864433
    assert crc64(b"") == 0
    data = bytes(range(256)) * 1000
    parts = [data[i:i + 70_000] for i in range(0, len(data), 70_000)]
    assert combine_parts([(crc64(p), len(p)) for p in parts]) == crc64(data)
    assert crc64(data[1000:], crc64(data[:1000])) == crc64(data)
