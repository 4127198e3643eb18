"""End to end in a real browser: headless Debian Chromium opens the page, its fake microphone
plays espeak-ng speech, and the avatar comes back over WebRTC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import shutil
import time

import cv2
import numpy as np
import pytest

from realtime_avatar.server import SERVER_KEY, create_app
from realtime_avatar.session import AvatarSession, SessionConfig
from tests.browser import CHROMIUM, avatar_similarity, chromium_page
from tests.rtc_client import serving
from tests.speech import espeak_wav

pytestmark = pytest.mark.browser
TOKEN = "page-token"
MIN_FRAMES = 50


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium")
def test_page_streams_mic_to_the_server_and_shows_the_avatar(runtime, tmp_path):
    # 48 kHz 16-bit PCM: what Chromium's fake capture device reads (it loops the file)
    wav = espeak_wav("Hello from the browser. One two three four.", tmp_path / "mic.wav", rate=48_000)
    shot_path = tmp_path / "avatar.png"

    async def factory():
        config = SessionConfig(streaming=runtime.streaming, render_budget_s=1.0, batch_size=8)
        return AvatarSession(runtime.encoder, runtime.renderer, config)

    async def scenario():
        app = create_app(factory, token=TOKEN)
        server = app[SERVER_KEY]
        async with serving(app) as url, chromium_page(tmp_path / "profile", wav) as page:
            await page.goto(f"{url}/?token={TOKEN}")
            t0 = time.monotonic()
            await page.click("#start")
            await wait_on_page(
                page, f"window.avatar.stats.framesDecoded >= {MIN_FRAMES} && window.avatar.server", 20,
                f"the page never decoded {MIN_FRAMES} frames",
            )
            took = time.monotonic() - t0
            page_state = await page.evaluate("window.avatar")
            assert list(server.peers) == [page_state["sessionId"]]
            peer = server.peers[page_state["sessionId"]]
            heard = peer.audio_in.as_dict()
            sent = peer.session.stats()["frames_sent"]
            png = await page.locator("#avatar").screenshot(path=str(shot_path))
            table = await page.inner_text("#stats")

            await page.click("#start")  # Stop: DELETE the session, close the peer
            await wait_on_page(page, "window.avatar.state === 'idle'", 5, "Stop did not return to idle")
            gone = await asyncio.wait_for(_wait_empty(server), 5)
            return page_state, heard, sent, png, table, took, gone

    page_state, heard, sent, png, table, took, gone = asyncio.run(scenario())
    shutil.copy(shot_path, "/tmp/realtime_avatar_browser.png")  # to look at after a run
    print(f"page timings (ms after Start) {page_state['timings']}; {MIN_FRAMES} frames decoded "
          f"{took:.2f} s after Start; server heard {heard}; "
          f"session gone {gone:.2f} s after Stop\n{table}")

    assert page_state["stats"]["connection"] == "connected"
    assert page_state["error"] is None
    assert heard["frames"] > 0 and heard["peak"] > 0.05  # real speech, not the silent fallback
    assert sent >= page_state["stats"]["framesDecoded"] >= MIN_FRAMES
    assert page_state["server"]["session"]["frames_sent"] > 0  # the page polls server stats
    assert page_state["stats"]["fps"] > 0
    assert page_state["playoutTargetMs"] == 0  # the page asked for the minimum receive buffer (issue 14)

    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 10, f"the video element looks blank (pixel std {image.std():.1f})"
    # and it is the avatar: the screenshot matches the avatar's frame (up to pose and codec)
    similarity = avatar_similarity(png, runtime.renderer.idle_frame(0))
    print(f"screenshot {image.shape[1]}x{image.shape[0]}, correlation with the avatar {similarity:.3f}")
    assert similarity > 0.8


async def wait_on_page(page, condition: str, timeout_s: float, what: str) -> None:
    """Wait for a JavaScript condition; on timeout fail with the page's state and console."""
    try:
        await page.wait_for_function(condition, timeout=timeout_s * 1000, polling=100)
    except Exception as exc:
        state = await page.evaluate("JSON.stringify(window.avatar)")
        raise AssertionError(f"{what} within {timeout_s} s ({exc}); window.avatar = {state}\n"
                             + "\n".join(page.console_lines)) from None


async def _wait_empty(server) -> float:
    start = time.monotonic()
    while server.peers:
        await asyncio.sleep(0.05)
    return time.monotonic() - start
