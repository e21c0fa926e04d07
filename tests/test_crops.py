"""Multi-crop geometry (paper sec. 7) against an independent reading of the paper's description."""

import pytest

from pipeline.data.crops import crop_subset, crops, crops_144, resized_size, scales_for


def paper_crops(W, H, S=224):
    """Written straight from the paper's sentence, without the library's helpers."""
    result = []
    for shorter in [256 * S // 224, 288 * S // 224, 320 * S // 224, 352 * S // 224]:
        if W >= H:
            w, h = round(W * shorter / H), shorter
            squares = [(0, 0), ((w - shorter) // 2, 0), (w - shorter, 0)]  # left, center, right
        else:
            w, h = shorter, round(H * shorter / W)
            squares = [(0, 0), (0, (h - shorter) // 2), (0, h - shorter)]  # top, center, bottom
        for x, y in squares:
            corners = [(x, y), (x + shorter - S, y), (x, y + shorter - S), (x + shorter - S, y + shorter - S)]
            boxes = [(cx, cy, cx + S, cy + S) for cx, cy in corners]
            m = (shorter - S) // 2
            boxes.append((x + m, y + m, x + m + S, y + m + S))  # center crop
            boxes.append((x, y, x + shorter, y + shorter))  # the whole square, resized to S
            for b in boxes:
                for mirror in (False, True):
                    result.append(((w, h), b, mirror))
    return result


@pytest.mark.parametrize("W,H", [(500, 375), (375, 500), (640, 427), (333, 500)])
def test_144_boxes_equal_the_papers_description(W, H):
    got = crops_144(W, H)
    assert len(got) == 144
    assert [(c.resized, c.box, c.mirror) for c in got] == paper_crops(W, H)
    for c in got:
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= c.resized[0] and 0 <= y0 < y1 <= c.resized[1]
        assert min(c.resized) == c.scale


def test_portrait_squares_are_top_center_bottom():
    got = crops_144(375, 500)
    wholes = [c.box for c in got if c.view == "whole" and not c.mirror and c.scale == 256]
    assert wholes == [(0, 0, 256, 256), (0, 42, 256, 298), (0, 85, 256, 341)]  # resized 256x341


def test_ten_crop_is_standard_ten_crop_of_center_square_at_first_scale():
    W, H = 500, 375
    ten = crops(W, H, 10)
    assert len(ten) == 10 and {c.scale for c in ten} == {256} and {c.square for c in ten} == {"center"}
    w, h = resized_size(W, H, 256)
    x = (w - 256) // 2
    expect = {(x, 0, x + 224, 224), (x + 32, 0, x + 256, 224), (x, 32, x + 224, 256), (x + 32, 32, x + 256, 256),
              (x + 16, 16, x + 240, 240)}
    assert {c.box for c in ten} == expect
    assert sorted(c.mirror for c in ten) == [False] * 5 + [True] * 5
    (one,) = crops(W, H, 1)
    assert one.box == (x + 16, 16, x + 240, 240) and not one.mirror and one.view == "center"
    assert set(crop_subset(1)) < set(crop_subset(10)) < set(crop_subset(144))


def test_square_image_keeps_duplicates_as_the_formula_counts():
    got = crops_144(300, 300)
    assert len(got) == 144
    assert len({(c.scale, c.box, c.mirror) for c in got}) == 144 // 3


def test_sizes_scale_with_input_size():
    assert scales_for(224) == (256, 288, 320, 352)
    assert scales_for(112) == (128, 144, 160, 176)
    got = crops_144(60, 40, input_size=56)
    assert len(got) == 144 and {c.size for c in got} == {56}
    assert [(c.resized, c.box, c.mirror) for c in got] == paper_crops(60, 40, 56)


def test_box_in_original_coordinates():
    c = crops(1000, 750, 1)[0]
    x0, y0, x1, y1 = c.box_in_original(1000, 750)
    f = 750 / 256
    assert (round(x0, 6), round(y0, 6)) == (round(c.box[0] * 1000 / c.resized[0], 6), round(16 * f, 6))
    assert abs((x1 - x0) - 224 * 1000 / c.resized[0]) < 1e-9 and abs((y1 - y0) - 224 * f) < 1e-9


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop scheme"):
        crop_subset(5)
    with pytest.raises(ValueError, match="positive"):
        crops_144(0, 10)
