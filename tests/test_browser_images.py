"""The Image search tab in Debian's Chromium against ``python app.py --tiny-models`` (fixtures of test_browser.py).

A visitor adds images, searches the library by text and reads the ranked names and scores; a bad upload and
an empty query are told in sentences, and the results on screen stay.
"""

from __future__ import annotations

import re

from test_browser import (  # noqa: F401 - the fixtures are used by name
    ASSETS,
    _assert_headers,
    _assert_small_print,
    _close_toasts,
    _open_tab,
    _see,
    _shot,
    app_url,
    expect,
    page,
    pytestmark,
)

from conftest import make_image
from mmdemo.ui.images import DEFAULT_LABELS

SCORE = re.compile(r"-?\d(\.\d{1,4})?")


def _rows(table) -> list[list[str]]:
    """The table's body rows as the visitor reads them: the non-empty cells of each."""
    rows = []
    for tr in table.locator("[role=row]").all()[1:]:  # row 1 is the header
        cells = [" ".join(c.split()) for c in tr.locator("[role=gridcell]").all_inner_texts()]
        if any(cells):
            rows.append([c for c in cells if c])
    return rows


def test_image_tab_adds_images_and_searches_by_text(page, tmp_path):  # noqa: F811
    _open_tab(page, "Image search")
    expect(page.locator("#images-library")).to_contain_text("red_circle.png")  # the bundled pictures
    expect(page.locator("#image_search-adapter input")).to_have_value("base")
    _assert_headers(page.locator("#images-results"), ["rank", "image", "score"])
    junk = tmp_path / "junk.png"
    junk.write_text("this is text, not a picture")
    mine = make_image(tmp_path / "my_green_square.png", "green", "square", size=48)
    page.locator("#images-uploads input[type=file]").set_input_files([str(mine), str(junk)])
    page.locator("#images-add").click()
    report = page.locator("#images-report")
    expect(report).to_contain_text("Added 1 image.")
    expect(report).to_contain_text("The library holds 7 images.")
    expect(report).to_contain_text("junk.png is a text file, not an image")
    expect(page.locator("#images-library")).to_contain_text("my_green_square.png")

    page.locator("#images-query textarea, #images-query input").first.fill("a green square")
    page.locator("#images-search").click()
    results = page.locator("#images-results")
    expect(results).to_contain_text(".png")
    rows = _rows(results)
    assert len(rows) == 5, rows
    assert [r[0].strip() for r in rows] == ["1", "2", "3", "4", "5"], rows
    assert all(r[1].strip().endswith(".png") and SCORE.fullmatch(r[2].strip()) for r in rows), rows
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True), scores
    gallery = page.locator("#images-gallery")
    expect(gallery.locator("img").first).to_be_visible()
    expect(gallery).to_contain_text("1. ")
    _assert_small_print(page, "images-text-info")
    _shot(page, "image_search_text")

    # an empty query: a sentence, and the ranked images stay on screen
    before = results.locator("table").first.inner_text()
    page.locator("#images-query textarea, #images-query input").first.fill("   ")
    page.locator("#images-search").click()
    _see(page, "Type some text to search for")
    assert results.locator("table").first.inner_text() == before
    _close_toasts(page)


def test_image_tab_searches_by_image(page):  # noqa: F811
    _open_tab(page, "Image search")
    page.get_by_role("tab", name="Search by image").click()
    page.locator("#images-picture input[type=file]").set_input_files(str(ASSETS / "images" / "star.png"))
    page.locator("#images-match").click()
    expect(page.locator("#images-similar")).to_contain_text("star.png")
    labels = _rows(page.locator("#images-labels-out"))
    assert len(labels) == 5 and all(row[1] in DEFAULT_LABELS for row in labels), labels
    similar = _rows(page.locator("#images-similar"))
    assert similar[0][:2] == ["1", "star.png"] and float(similar[0][2]) > 0.999, similar  # itself, at 1.0
    _assert_small_print(page, "images-labels-info")
    _assert_small_print(page, "images-similar-info")
    _shot(page, "image_search_image")
