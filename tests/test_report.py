"""The run report as a page a browser opens by itself, and its sample grid."""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from pipelines.render import class_grid, png
from pipelines.report import page


def test_the_sample_grid_holds_samples_only():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (9, 32, 32, 3), dtype=np.uint8)  # no black pixel anywhere
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2])[rng.permutation(9)]
    grid = np.asarray(Image.open(io.BytesIO(class_grid(images, labels, classes=2, per_class=8))))
    assert grid.shape == (2 * 64, 3 * 64, 3)  # two classes, three samples each (the fewer), enlarged to 64 px
    assert grid.min(axis=2).min() > 0
    first = images[labels == 1][0].repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(grid[64:, :64], first)


def test_the_report_page_is_one_html_document_with_its_pictures_inside():
    picture = png(np.full((4, 4, 3), 200, np.uint8))
    text = "# Run <report>\n\n| metric | value |\n|---|---|\n| FD_effnet | 1.5 |\n\n![samples](samples_grid.png)\n"
    html = page("Run <report>", text, {"samples_grid.png": picture})
    assert html.startswith("<!DOCTYPE html>") and "<title>Run &lt;report&gt;</title>" in html
    assert "<td>FD_effnet</td>" in html and "<report>" not in html
    [src] = re.findall(r'<img src="([^"]+)"', html)
    assert src.startswith("data:image/png;base64,") and ".png" not in html
