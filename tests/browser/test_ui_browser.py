"""A live `fashion-search ui` driven by headless Chromium: upload, modify, see results, refine, history;
catalog filters on a shop's product catalog."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fashion_search.service.ui_launch import wait_until_up
from service_fixtures import build_service_index, build_shop_index, free_port

CHROMIUM = os.environ.get("FASHION_SEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.browser
# Streamlit marks elements of the previous run stale until the new run replaces them.
SETTLED = """() => !document.querySelector('[data-stale="true"]')
    && !document.querySelector('[data-testid="stStatusWidgetRunningIcon"], [data-testid="stStatusWidgetRunningManIcon"]')"""


@contextlib.contextmanager
def running_ui(index: Path, tmp_path: Path):
    """`fashion-search ui` on a free port, in its own process group so teardown stops Streamlit too."""
    port = free_port()
    log = (tmp_path / "ui.log").open("w")
    cmd = [sys.executable, "-m", "fashion_search.cli", "ui", "--index", str(index), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(url, timeout=45, proc=proc):
            pytest.fail(f"the UI did not come up; log:\n{(tmp_path / 'ui.log').read_text()[-3000:]}")
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        log.close()


@pytest.fixture
def live_ui(tmp_path):
    with running_ui(build_service_index(tmp_path), tmp_path) as url:
        yield url, tmp_path / "catalog"


@pytest.fixture
def live_shop(tmp_path):
    index, rows = build_shop_index(tmp_path)
    with running_ui(index, tmp_path) as url:
        yield url, rows


@contextlib.contextmanager
def browser_page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (the Makefile does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            # Tall enough for the whole page: Streamlit scrolls an inner pane, which full_page does not expand.
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def test_upload_modify_refine(live_ui, tmp_path):
    from playwright.sync_api import expect

    url, catalog = live_ui
    started = time.monotonic()
    with browser_page() as page:
        page.goto(url)
        expect(page.get_by_text("Start with a reference photo")).to_be_visible(timeout=45_000)

        # Fewer results: k drives the grid.
        k_box = page.locator(".st-key-k input")
        k_box.fill("8")
        k_box.press("Enter")
        expect(k_box).to_have_value("8")

        # Upload a photo: an image-only search finds the same catalog item first, score 1.000.
        page.locator(".st-key-upload input[type=file]").set_input_files(str(catalog / "dress/item06.jpg"))
        expect(page.locator(".st-key-reference img")).to_be_visible()
        expect(page.locator(".st-key-result_0")).to_contain_text("dress/item06.jpg")
        expect(page.locator(".st-key-result_0")).to_contain_text("similarity 1.000")

        # Type the change: composed search, k cards each with an image and a score.
        text = page.get_by_label("What should be different?")
        text.fill("is darker with long sleeves")
        text.press("Enter")
        expect(
            page.get_by_text("Results for reference photo + “is darker with long sleeves”")
        ).to_be_visible()
        cards = page.locator("[class*='st-key-result_']")
        expect(cards).to_have_count(8)
        for i in range(8):
            expect(cards.nth(i).locator("img")).to_be_visible()
            expect(cards.nth(i)).to_contain_text("similarity")

        # Refine: the second result becomes the reference and the conversation records the turn.
        chosen = cards.nth(1).locator("code").inner_text()
        page.locator(".st-key-use_1 button").click()
        expect(page.locator(".st-key-turn_0")).to_contain_text("Turn 1")
        expect(page.locator(".st-key-turn_0")).to_contain_text(f"picked {chosen}")
        expect(page.locator(".st-key-reference")).to_contain_text(chosen)
        expect(text).to_have_value("")
        text.fill("in red")
        text.press("Enter")
        expect(page.get_by_text("Results for reference photo + “in red”")).to_be_visible()
        page.locator(".st-key-use_2 button").click()
        expect(page.locator(".st-key-turn_1")).to_contain_text("Turn 2")
        expect(page.get_by_text("Conversation · 2 turns")).to_be_visible()
        page.wait_for_function(SETTLED)
        ids = cards.locator("code").all_inner_texts()
        assert len(ids) == 8 and len(set(ids)) == 8, ids
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000

        # Back one turn: the history shrinks and the text of that turn returns.
        page.locator(".st-key-back button").click()
        expect(page.locator(".st-key-turn_1")).to_have_count(0)
        expect(text).to_have_value("in red")
    assert time.monotonic() - started < 80


def test_filters_narrow_the_results(live_shop, tmp_path):
    """Pick a brand and a price range in the sidebar: every card shown then satisfies both."""
    from playwright.sync_api import expect

    url, rows = live_shop
    by_id = {i: r for i, r in rows.items()}
    with browser_page() as page:
        page.goto(url)
        expect(page.get_by_text("Start with a reference photo")).to_be_visible(timeout=45_000)
        text = page.get_by_label("What should be different?")
        text.fill("a striped garment")
        text.press("Enter")
        cards = page.locator("[class*='st-key-result_']")
        expect(cards).to_have_count(6)  # one card per product

        # Every photo rather than one per product, then one brand from the multiselect.
        page.locator(".st-key-group label").click()
        expect(cards).to_have_count(12)
        page.locator(".st-key-flt_brand [role='combobox']").click()
        page.get_by_role("option", name="Zed", exact=True).click()
        page.keyboard.press("Escape")
        zed = sorted(i for i, r in rows.items() if r["brand"] == "Zed")
        expect(cards).to_have_count(len(zed))

        # The price slider's upper handle, one page down with the keyboard: one rerun, no in-between
        # states. Focus waits for the brand's rerun to end, which re-draws the sidebar.
        page.wait_for_function(SETTLED)
        high = page.locator(".st-key-flt_price input[type=range]").nth(1)
        high.focus()
        page.keyboard.press("PageDown")
        expect(high).not_to_have_value("95")
        limit = float(high.get_attribute("value"))
        cheap = sorted(i for i in zed if by_id[i]["price"] <= limit)
        assert 0 < len(cheap) < len(zed), limit
        expect(cards).to_have_count(len(cheap))
        page.wait_for_function(SETTLED)
        shown = sorted(cards.locator("code").all_inner_texts())
        assert shown == cheap, shown
        for i in range(len(cheap)):
            card = cards.nth(i)
            expect(card.locator("img")).to_be_visible()
            expect(card).to_contain_text("Zed · price")
            link = card.get_by_role("link", name="View in shop")
            assert link.get_attribute("href").startswith("https://shop.example/p/")
        page.screenshot(path=str(tmp_path / "ui_filters.png"), full_page=True)
