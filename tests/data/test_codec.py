"""Map bytes: PNG and raw maps read back alike, and a damaged raw map is refused by name."""

import numpy as np
import pytest

from eir.data.codec import RAW_MAP_MAGIC, decode_map, encode_png, encode_raw_map


def _map(height: int = 7, width: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(height, width), dtype=np.uint8)


def test_raw_and_png_maps_decode_to_the_same_array() -> None:
    values = _map()
    raw, png = decode_map(encode_raw_map(values)), decode_map(encode_png(values))
    np.testing.assert_array_equal(raw, values)
    np.testing.assert_array_equal(png, values)
    assert raw.dtype == np.uint8 and raw.flags.writeable  # torch refuses read-only arrays


def test_a_raw_map_is_a_header_and_the_values() -> None:
    values = _map(3, 4)
    data = encode_raw_map(values)
    assert data.startswith(RAW_MAP_MAGIC)
    assert len(data) == len(RAW_MAP_MAGIC) + 8 + values.size
    assert data[-values.size :] == values.tobytes()


def test_a_non_contiguous_map_is_encoded_by_its_values() -> None:
    values = _map(6, 6)[::2, 1::2]
    np.testing.assert_array_equal(decode_map(encode_raw_map(values)), values)


@pytest.mark.parametrize("values", [np.zeros((4, 4), dtype=np.int64), np.zeros((2, 4, 4), dtype=np.uint8)])
def test_only_h_x_w_uint8_maps_are_encoded(values: np.ndarray) -> None:
    with pytest.raises(ValueError, match="H x W uint8"):
        encode_raw_map(values)


def test_a_truncated_raw_map_is_refused_with_its_size() -> None:
    with pytest.raises(ValueError, match=r"raw map of 7 x 5 holds 34 value bytes; expected 35"):
        decode_map(encode_raw_map(_map())[:-1])
