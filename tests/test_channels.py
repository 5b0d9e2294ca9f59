"""Class ids ↔ model channels (eir.channels.ChannelSpace)."""

from __future__ import annotations

import numpy as np

from eir.channels import ChannelSpace
from eir.tasks import get_task


def test_in_natural_order_a_channel_is_its_class_id() -> None:
    space = ChannelSpace.of(get_task("voc", "15-5"))
    assert space.class_of_channel == tuple(range(21)) and space.head_sizes == (15, 5)
    assert np.array_equal(space.lut[:21], np.arange(21)) and space.lut[255] == 255


def test_a_class_order_puts_channels_in_step_order() -> None:
    space = ChannelSpace.of(get_task("camvid", "6-5", class_order=[11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    # Step 0 learns {1, 2, 3, 4, 5, 11} (sorted), step 1 learns 6..10.
    assert space.class_of_channel == (0, 1, 2, 3, 4, 5, 11, 6, 7, 8, 9, 10)
    assert space.lut[11] == 6 and space.lut[6] == 7 and space.lut[0] == 0
    train_lut = get_task("camvid", "6-5", class_order=[11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).train_lut(0)
    assert space.map_lut(train_lut)[11] == 6 and space.map_lut(train_lut)[6] == 0  # a future class is background


def test_groups_split_old_and_new_channels_of_a_step() -> None:
    space = ChannelSpace.of(get_task("voc", "15-1"))
    assert space.groups(0) == (tuple(range(1, 16)), ())
    assert space.groups(2) == (tuple(range(1, 16)), (16, 17))
    assert space.seen(5) == 20
