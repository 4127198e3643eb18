"""The live preview: the Tk window on a real X server (Xvfb) and the watch-only page (headless
Chromium). The microphone-driven runs of both are in test_live_jack.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from aiortc import RTCPeerConnection

from realtime_avatar.cli import PreviewError, choose_preview, main
from realtime_avatar.preview import PagePreview, check_watch_offer, display_available, ppm_bytes
from realtime_avatar.server import OfferError
from realtime_avatar.session import AvatarSession, SessionConfig
from tests.browser import CHROMIUM, avatar_similarity, chromium_page
from tests.speech import espeak_wav, read_wav
from tests.xvfb import x_display  # noqa: F401 - a fixture


def test_ppm_bytes_is_a_p6_image_in_rgb_order():
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = (255, 0, 0)  # blue in BGR
    data = ppm_bytes(image)
    header, pixels = data.split(b"\n", 1)
    assert header == b"P6 3 2 255"
    assert len(pixels) == 2 * 3 * 3
    assert tuple(pixels[:3]) == (0, 0, 255)  # written as RGB
    with pytest.raises(ValueError, match="uint8"):
        ppm_bytes(image.astype(np.float32))


def test_without_a_display_auto_means_page_and_window_is_refused(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert "DISPLAY" in display_available()
    assert choose_preview("auto") == "page"
    assert choose_preview("none") == "none"
    with pytest.raises(PreviewError, match="--preview page"):
        choose_preview("window")


def test_live_cli_refuses_a_window_without_a_display(monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["live", "--mic", "--preview", "window"]) == 2
    assert "no display" in capsys.readouterr().err


def test_watch_offer_must_ask_for_video():
    async def offer(kinds):
        pc = RTCPeerConnection()
        for kind in kinds:
            pc.addTransceiver(kind, direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    assert check_watch_offer(asyncio.run(offer(["video", "audio"])))
    with pytest.raises(OfferError, match="does not ask for video") as refused:
        check_watch_offer(asyncio.run(offer(["audio"])))
    assert refused.value.status == 400
    with pytest.raises(OfferError, match="must start with 'v=0'"):
        check_watch_offer("hello")


WINDOW_CHECK = """
import json, sys
import numpy as np
from realtime_avatar.preview import WindowPreview
window = WindowPreview("test")
rng = np.random.default_rng(0)
out = {"sizes": [], "pixels_match": [], "shown": []}
for _ in range(3):
    image = rng.integers(0, 256, (48, 64, 3), np.uint8)
    window.show(image)
    window.pump()
    out["sizes"].append([window.photo.width(), window.photo.height()])
    out["pixels_match"].append(all(tuple(window.photo.get(x, y)) == tuple(int(v) for v in image[y, x, ::-1])
                                   for y, x in [(0, 0), (47, 63), (20, 30)]))
    out["shown"].append(window.frames_shown)
window.pump()  # nothing new: nothing redrawn
out["shown_after_idle_pump"] = window.frames_shown
window.close()
window.pump()  # harmless after close
out["closed"] = window.closed
print(json.dumps(out))
"""


def test_window_shows_the_frames_it_is_given(x_display):
    """In a child process: Tk keeps its X connection until the process exits, and Xlib ends the
    process when that server goes away (as this test's Xvfb does), which would end pytest."""
    pytest.importorskip("tkinter")
    assert display_available() is None and choose_preview("auto") == "window"
    done = subprocess.run([sys.executable, "-c", WINDOW_CHECK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["sizes"] == [[64, 48]] * 3
    assert out["pixels_match"] == [True] * 3  # what is on screen is the frame given, in RGB
    assert out["shown"] == [1, 2, 3] and out["shown_after_idle_pump"] == 3
    assert out["closed"]


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium")
def test_chromium_watches_a_session_on_the_preview_page(runtime, tmp_path):
    """A session fed with speech in real time; Chromium opens the watch-only page."""
    speech, rate = read_wav(espeak_wav("Watching the avatar speak on the preview page.",
                                       tmp_path / "s.wav", rate=16_000))
    config = SessionConfig(streaming=runtime.streaming, render_budget_s=1.0, batch_size=8)
    shot = tmp_path / "preview.png"

    async def feed(session, seconds: float):
        """Speech then silence, pushed in 20 ms packets at the real-time rate."""
        packet = rate // 50
        audio = np.concatenate([speech, np.zeros(int(seconds * rate) - len(speech), np.float32)])
        t0 = time.monotonic()
        for k, start in enumerate(range(0, len(audio), packet)):
            session.push_pcm(audio[start : start + packet], rate)
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 - time.monotonic()))

    async def scenario():
        session = AvatarSession(runtime.encoder, runtime.renderer, config)
        await session.start()
        preview = PagePreview(session, port=0)
        url = await preview.start()
        feeding = asyncio.create_task(feed(session, 15.0))
        try:
            async with chromium_page(tmp_path / "profile", tmp_path / "s.wav") as page:
                await page.goto(url)
                await page.wait_for_function("window.preview.framesDecoded >= 50", timeout=20_000, polling=100)
                state = await page.evaluate("window.preview")
                png = await page.locator("#avatar").screenshot(path=str(shot))
                muted = await page.evaluate("document.getElementById('avatar').muted")
                viewers = len(preview.peers)
        finally:
            feeding.cancel()
            await preview.close()
            stats = session.stats()
            await session.close()
        return state, png, muted, viewers, stats

    state, png, muted, viewers, stats = asyncio.run(scenario())
    print(f"page {state}; session {stats}")
    assert state["state"] == "connected" and state["error"] is None
    assert state["framesDecoded"] >= 50
    assert muted  # the preview's sound starts muted (it would feed back into the microphone)
    assert viewers == 1
    assert stats["frames_sent"] >= state["framesDecoded"]
    similarity = avatar_similarity(png, runtime.renderer.idle_frame(0))
    print(f"screenshot correlation with the avatar {similarity:.3f}")
    assert similarity > 0.8
