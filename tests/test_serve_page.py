"""The chat page at ``/`` in a real headless browser: Debian's ``chromium`` driven by Playwright for Python (the system
browser through ``executable_path``; Playwright's own download is not used). A prompt with an uploaded image, then a
second turn: the streamed answers the page shows equal the API's answers to the same conversation, and
``CombinedModel.chat``'s for the first; an error the server gives shows on the page."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import openai
import pytest

from merge.runtime import CombinedModel
from merge.serve.app import background_server
from merge.serve.service import ServeOptions, Service
from merge.tools.verify import default_images

TOKENS = 12


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root: no user namespace sandbox
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        yield browser
        browser.close()


def _answer(page) -> str:
    return page.eval_on_selector("#answer", "node => node.textContent")


def _send(page, text: str, image: Path | None = None, max_tokens: int = TOKENS) -> None:
    page.fill("#prompt", text)
    if image is not None:
        page.set_input_files("#image", str(image))
    page.fill("#max-tokens", str(max_tokens))
    page.evaluate("window.answerUpdates = 0")
    page.click("#send")
    page.wait_for_selector("#status[data-state='done'], #status[data-state='error']", timeout=60_000)


def test_the_page_streams_the_apis_answer(browser, combined, tmp_path):
    folder = combined("tiny")
    picture = tmp_path / "picture.png"
    default_images(1)[0].save(picture)
    url_of_picture = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    service = Service(folder, ServeOptions(max_batch=2, max_tokens=64, model_name="tiny"))
    with background_server(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        # count the answer's updates: a streamed answer is written piece by piece
        page.evaluate("""new MutationObserver((records) => {
            for (const r of records) if (r.target.id === 'answer') window.answerUpdates += 1;
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")

        _send(page, "Describe the image.", picture)
        assert page.get_attribute("#status", "data-state") == "done"
        shown = _answer(page)
        first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_of_picture}},
                                              {"type": "text", "text": "Describe the image."}]}]
        api = client.chat.completions.create(model="tiny", messages=first, max_tokens=TOKENS, temperature=0)
        assert shown == api.choices[0].message.content
        assert shown == CombinedModel(folder).chat("Describe the image.", [picture], max_new_tokens=TOKENS)[0]
        assert page.evaluate("window.answerUpdates") > 2  # streamed, not written once at the end
        assert page.locator(".turn.user img").count() == 1

        _send(page, "And now?")  # the second turn carries the first, as a chat does
        conversation = [*first, {"role": "assistant", "content": shown}, {"role": "user", "content": [
            {"type": "text", "text": "And now?"}]}]
        api = client.chat.completions.create(model="tiny", messages=conversation, max_tokens=TOKENS)
        assert _answer(page) == api.choices[0].message.content

        _send(page, "Too long.", max_tokens=65)  # past the server's --max-tokens: its error, shown
        assert page.get_attribute("#status", "data-state") == "error"
        assert "max_tokens must be from 1 to 64" in _answer(page)
        assert page.get_attribute("#answer", "class") == "turn assistant error"
        assert not errors
        page.close()
