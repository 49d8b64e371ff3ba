"""`blsp ui` in headless Chromium: upload a WAV, type an instruction, see a streamed answer, then a text turn."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT_DIR = Path(os.environ.get("BLSP_SCREENSHOT_DIR", ""))


def wait_for_answer(page, n_bot: int, timeout_s: float = 240) -> str:
    """Wait until the ``n_bot``-th assistant message is non-empty and stops growing."""
    bot = page.locator("#blsp-chat .bot")
    deadline, last, stable = time.monotonic() + timeout_s, None, 0
    while time.monotonic() < deadline:
        text = bot.nth(n_bot - 1).inner_text().strip() if bot.count() >= n_bot else ""
        busy = page.locator("#blsp-chat .pending, #blsp-chat .generating").count() > 0
        stable = stable + 1 if text and text == last and not busy else 0
        if stable >= 4:
            return text
        last = text
        page.wait_for_timeout(500)
    raise AssertionError(
        f"no complete answer {n_bot} after {timeout_s} s; chat shows: {page.locator('#blsp-chat').inner_text()!r}"
    )


def test_ui_upload_instruction_streamed_answer(launch, real_adapter_dir, speech_wav, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian chromium is not installed (apt-get install -y chromium); the browser test needs it"
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    wav = speech_wav("The quick brown fox jumps over the lazy dog.")
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "fox.wav").write_bytes(wav.read_bytes())
    run = launch(
        [
            "ui",
            str(real_adapter_dir),
            "--device",
            "cpu",
            "--max-new-tokens",
            "16",
            "--examples-dir",
            str(examples),
        ],
        "/",
        tmp_path / "ui.log",
    )
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 1100})
                page.goto(run.url, timeout=120_000)
                page.wait_for_selector("#blsp-audio input[type=file]", state="attached", timeout=120_000)
                assert (
                    page.locator("text=Please repeat the following words.").count() >= 1
                )  # examples prefilled

                page.locator("#blsp-audio input[type=file]").set_input_files(str(wav))
                page.wait_for_selector(
                    "#blsp-audio audio, #blsp-audio .waveform-container, #blsp-audio button", timeout=60_000
                )
                page.locator("#blsp-instruction textarea").fill("Please repeat the following words.")
                page.locator("#blsp-send").click()
                first = wait_for_answer(page, 1)
                assert first
                chat_text = page.locator("#blsp-chat").inner_text()
                assert "Please repeat the following words." in chat_text
                assert (
                    page.locator(
                        "#blsp-chat audio, #blsp-chat .audio-container, #blsp-chat [data-testid*=audio]"
                    ).count()
                    >= 1
                ), "the uploaded clip is not shown in the conversation"

                # A text turn continues the same conversation.
                page.locator("#blsp-instruction textarea").fill("Thank you. Say it once more.")
                page.locator("#blsp-send").click()
                second = wait_for_answer(page, 2)
                assert second

                shot = tmp_path / "ui.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                if SCREENSHOT_DIR.name:
                    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
                    (SCREENSHOT_DIR / "ui.png").write_bytes(shot.read_bytes())
            finally:
                browser.close()
    except BaseException:
        print(run.log_tail())
        raise
