"""The one pixel <-> grid rule, pinned against the backend alignment contract."""
import numpy as np
import pytest

from clips4.pipeline.grid import centre_index, pixel_to_cell, resize_nearest


@pytest.mark.parametrize("H,h", [(10, 3), (7, 7), (480, 30), (13, 4), (1, 1), (3, 10)])
def test_pixel_lies_in_the_cell_that_holds_its_centre(H, h):
    """Contract: cell i covers [i*H/h, (i+1)*H/h); pixel y covers [y, y+1) and belongs where its centre is."""
    ys, _ = pixel_to_cell(H, 1, h, 1)
    for y, c in enumerate(ys):
        assert c * H / h <= y + 0.5 < (c + 1) * H / h


def test_the_case_where_two_formulas_disagreed():
    # H=10, h=3: row 3 (centre 3.5) is in cell 1 = [3.33, 6.67), not cell 0 as floor(y*h/H) says
    assert pixel_to_cell(10, 10, 3, 3)[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_resize_nearest_both_ways_uses_the_same_rule():
    grid = np.arange(12).reshape(3, 4)
    up = resize_nearest(grid, (10, 9))
    ys, xs = pixel_to_cell(10, 9, 3, 4)
    np.testing.assert_array_equal(up, grid[ys[:, None], xs[None, :]])
    img = np.arange(16).reshape(4, 4)
    assert resize_nearest(img, (2, 2)).tolist() == [[5, 7], [13, 15]]  # each cell takes its centre pixel
    assert centre_index(4, 2).tolist() == [1, 3]
    with pytest.raises(ValueError):
        centre_index(0, 3)
