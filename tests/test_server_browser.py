"""The chat page (GET / of cli.py --serve) in a real browser: Playwright driving the system's Chromium (Debian
package `chromium`). It streams an answer from /v1/chat/completions, shows its kept fraction and KV bytes beside
it, offers policies (the server's own first) and sends the one picked, with a kv_budget for auto, and carries the
conversation into the next turn. Skips, saying why, where no browser is found."""
import json
import os
import shutil
import urllib.request

import pytest
from conftest import save_tiny_chat_model
from test_server import free_port, start_server, wait_ready

CHROMIUM = os.environ.get("TINYGEN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, default_model_dir):
    if CHROMIUM is None:
        pytest.skip("no Chromium found (apt-get install chromium, or TINYGEN_CHROMIUM=/path/to/chrome)")
    pytest.importorskip("playwright", reason="playwright is a test requirement (requirements.txt)")
    model = save_tiny_chat_model(tmp_path_factory.mktemp("page") / "model", default_model_dir, 256)
    port = free_port()
    p = start_server(model, port)
    url = f"http://127.0.0.1:{port}"
    wait_ready(p, url)
    yield url
    p.terminate()
    p.wait(timeout=30)


def test_chat_page_streams_and_shows_the_cache(page_server):
    from playwright.sync_api import sync_playwright

    url = page_server
    body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}).encode()
    want = json.loads(urllib.request.urlopen(urllib.request.Request(
        url + "/v1/chat/completions", body, {"Content-Type": "application/json"})).read())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#policy option').length > 0")
            offered = page.locator("#policy option").all_inner_texts()
            assert offered[0] == "auto" and {"full", "local+frequent"} <= set(offered), offered
            page.fill("#prompt", "Hello!")
            page.click("#send")
            stats = page.locator(".assistant .stats").first
            stats.wait_for(timeout=30000)
            answer = page.locator(".assistant").first.evaluate("e => e.firstChild.data")
            assert answer == want["choices"][0]["message"]["content"]
            u = want["usage"]
            line = stats.inner_text()
            assert f"kept {100 * u['kept_fraction']:.1f}%" in line and "policy auto at 0.7 |" in line
            assert f"KV {u['kv_bytes'] / 2**20:.2f} MiB vs full {u['kv_bytes_full'] / 2**20:.2f} MiB" in line
            page.select_option("#policy", "full")  # another policy for the second turn, which carries the first
            assert page.locator("#budget").is_disabled()
            page.fill("#prompt", "And then?")
            page.click("#send")
            page.locator(".assistant .stats").nth(1).wait_for(timeout=30000)
            line = page.locator(".assistant .stats").nth(1).inner_text()
            assert "policy full |" in line and "kept 100.0%" in line, line
            page.select_option("#policy", "auto")  # a third at auto with its own kv_budget
            page.fill("#budget", "0.5")
            page.fill("#prompt", "Why?")
            page.click("#send")
            page.locator(".assistant .stats").nth(2).wait_for(timeout=30000)
            line = page.locator(".assistant .stats").nth(2).inner_text()
            assert "policy auto at 0.5 |" in line, line
            assert page.locator(".user").all_inner_texts() == ["Hello!", "And then?", "Why?"]
            assert "error" not in page.locator("#log").inner_text()
        finally:
            browser.close()
