"""The story studio in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): type,
Generate and watch the text stream in, Stop mid-way (the request is aborted and its blocks freed), Retry,
Undo, and the memory panel live during generation. The screenshot is kept in test-artifacts/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from live_server import sample, scrape

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PROMPT = "Captain Ada stood on the bridge of the Starling as the alien fleet"


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium is not installed (scripts/test.sh installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        pg.goto(server.url + "/")
        yield pg
        browser.close()


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_generate_stream_stop_retry_undo_and_the_memory_panel(server, page):
    page.wait_for_function("document.getElementById('model').textContent.includes('context')", timeout=60_000)
    assert server.name in page.inner_text("#model")
    page.fill(
        "#memory", "The Starling is humanity's last ark. Captain Ada Okoro, stern and kind, commands it."
    )
    page.fill("#note", "Tense, vivid, short sentences.")
    page.fill("#story", PROMPT)
    page.fill("#max_new_tokens", "300")
    story = lambda: page.input_value("#story")  # noqa: E731
    page.click("#generate")
    # Streamed: the text appears and keeps growing while the request runs.
    first = wait_for(lambda: len(story()) > len(PROMPT) + 5 and story(), what="the first tokens")
    assert first.startswith(PROMPT)
    wait_for(lambda: len(story()) > len(first) + 10, what="the text to grow")
    # The memory panel during generation: weights and KV bytes, and KV blocks in use.
    wait_for(
        lambda: page.inner_text("#kvtext").split(" / ")[0].strip() not in ("", "0"), what="KV blocks in use"
    )
    assert page.inner_text("#mem-weights") not in ("0 B", "–")
    assert page.inner_text("#mem-kv") not in ("0 B", "–")
    wait_for(lambda: len(story()) > len(PROMPT) + 200, timeout=90, what="a paragraph for the screenshot")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)
    # Stop mid-way: the text stops growing, the request is aborted, its blocks freed.
    assert page.is_enabled("#stop")
    page.click("#stop")
    wait_for(lambda: page.is_enabled("#generate"), what="Generate to come back")
    stopped = story()
    time.sleep(0.5)
    assert story() == stopped
    wait_for(lambda: sample(scrape(server.url), "fitllm_kv_blocks", state="used") == 0, what="blocks freed")
    assert sample(scrape(server.url), "fitllm_requests_finished_total", reason="abort") >= 1
    # Retry replaces the last continuation with a new one (sampled: a different text).
    page.click("#retry")
    wait_for(lambda: page.is_enabled("#stop"), what="the retry to start")
    wait_for(lambda: len(story()) > len(PROMPT) + 5, what="retried text")
    page.click("#stop")
    wait_for(lambda: page.is_enabled("#generate"), what="the retry to stop")
    retried = story()
    assert retried.startswith(PROMPT) and retried != stopped
    # Undo goes back to the story before the continuation; Redo brings it back.
    page.click("#undo")
    assert story() == PROMPT
    page.click("#redo")
    assert story() == retried
    # The counter counts story + memory + note against the context length.
    wait_for(lambda: "/ 512 tokens" in page.inner_text("#counter"), what="the token counter")


def test_page_is_served_and_its_api_answers(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "fitllm story studio" in r.text
    c = httpx.post(
        server.url + "/studio/api/context", json={"story": "Once upon a time", "memory": "Mars."}
    ).json()
    assert c["context_length"] == 512 and 0 < c["total_tokens"] < 20 and c["dropped_tokens"] == 0
    bad = httpx.post(server.url + "/studio/api/generate", json={"story": "", "memory": ""})
    assert bad.status_code == 400 and "empty" in bad.json()["error"]["message"]


def test_save_and_load_a_story(page, tmp_path):
    page.fill("#memory", "Saved memory.")
    page.fill("#note", "Saved note.")
    page.fill("#story", "Saved story text.")
    page.select_option("#preset", "fantasy")
    page.fill("#seed", "1234")
    with page.expect_download() as info:
        page.click("#save")
    path = tmp_path / "story.json"
    info.value.save_as(path)
    data = json.loads(path.read_text())
    assert (data["memory"], data["note"], data["story"]) == (
        "Saved memory.",
        "Saved note.",
        "Saved story text.",
    )
    assert data["settings"]["temperature"] == 0.85 and data["settings"]["seed"] == 1234
    for box in ("#memory", "#note", "#story"):
        page.fill(box, "")
    page.select_option("#preset", "deterministic")
    page.set_input_files("#loadfile", str(path))
    wait_for(lambda: page.input_value("#story") == "Saved story text.", what="the loaded story")
    assert page.input_value("#memory") == "Saved memory." and page.input_value("#note") == "Saved note."
    assert page.input_value("#temperature") == "0.85" and page.input_value("#seed") == "1234"


def test_two_tabs_generate_together(server, page):
    other = page.context.browser.new_page()
    other.goto(server.url + "/")
    for pg, text in ((page, "The dragon spoke first:"), (other, "Far beyond the last star,")):
        pg.fill("#story", text)
        pg.fill("#max_new_tokens", "200")
        pg.select_option("#preset", "scifi")
        pg.fill("#max_new_tokens", "200")
    page.click("#generate")
    other.click("#generate")
    # Both requests run in the same engine steps (each tab is its own client and story).
    wait_for(
        lambda: httpx.get(server.url + "/studio/api/memory").json()["requests"]["running"] == 2,
        what="both generations running together",
    )
    for pg in (page, other):
        pg.click("#stop")
        wait_for(lambda pg=pg: pg.is_enabled("#generate"), what="stop")
    assert page.input_value("#story").startswith("The dragon spoke first:")
    assert other.input_value("#story").startswith("Far beyond the last star,")
    other.close()


def test_memory_panel_shows_cached_story_kv_and_the_last_turns_reuse(server, page):
    """Two turns of one story: the second finds the first's memory + story in the prefix cache, and the panel
    shows it (cached / shifted / from host / prefilled) beside the cached story KV's bytes and blocks; the
    context shift choice reaches the engine (server default: on for the studio; "off" sent as false)."""
    from stand_ins import AddTap

    page.fill(
        "#memory", "The lighthouse keeper, Mara Quill, has kept the Skerry light for forty years alone."
    )
    page.fill("#note", "")
    page.fill("#story", "On the night the lamp went dark, Mara climbed the stairs with a candle and")
    page.select_option("#preset", "deterministic")
    page.fill("#max_new_tokens", "8")
    reuse = lambda: page.inner_text("#reuse")  # noqa: E731
    seen = []
    with AddTap(server.engine) as tap:
        for choice in ("", "off"):
            page.select_option("#context_shift", choice)
            before = reuse()
            page.click("#generate")
            wait_for(
                lambda before=before: reuse() != before and page.is_enabled("#generate"), what="the turn"
            )
            seen.append([int(x) for x in reuse().split(" / ")])
        assert [p.context_shift for _, p in tap.added] == [True, False]
    (c1, s1, h1, p1), (c2, s2, h2, p2) = seen
    assert p1 > 0 and s1 == h1 == s2 == h2 == 0
    assert c2 >= 16 and c2 + p2 > c1 + p1  # the story grew, and what it held was found cached
    mem = httpx.get(server.url + "/studio/api/memory").json()
    assert mem["cached_kv"]["blocks"] > 0 and mem["cached_kv"]["bytes"] == mem["tags"]["kv_cached"] > 0

    def cached_line() -> tuple[str, int] | None:
        size, _, blocks = page.inner_text("#cachedkv").partition(" · ")
        return (size, int(blocks.split()[0])) if blocks.endswith(" blocks") else None

    size, blocks = wait_for(lambda: (c := cached_line()) and c[1] > 0 and c, what="the cached story KV line")
    assert size not in ("0 B", "–")
