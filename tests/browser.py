"""Headless Debian Chromium for end-to-end tests, driven by Playwright for Python.

Playwright starts the system browser (`executable_path`), never one it downloads: do not run
`playwright install`. The flags make a WAV file the microphone, grant the permission prompt,
and let WebRTC use 127.0.0.1 (without --allow-loopback-in-peer-connection a loopback-only
host gathers no usable candidate and ICE never finishes).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator

CHROMIUM = Path("/usr/bin/chromium")


def chromium_args(fake_audio_wav: Path) -> list[str]:
    """Chromium flags for a headless WebRTC test whose microphone plays `fake_audio_wav`
    (16-bit PCM; 24-bit or a missing file gives silence while getUserMedia still succeeds)."""
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_audio_wav}",
        "--allow-loopback-in-peer-connection",
        "--autoplay-policy=no-user-gesture-required",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]


@contextlib.asynccontextmanager
async def chromium_page(user_data_dir: Path, fake_audio_wav: Path) -> AsyncIterator["Page"]:  # noqa: F821
    """A page in a fresh headless Chromium profile at `user_data_dir`; closed on exit.

    Console messages and page errors are kept on `page.console_lines` for failure reports.
    """
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get install -y chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=str(CHROMIUM),
            headless=True,  # Playwright adds --headless
            args=chromium_args(fake_audio_wav),
            viewport={"width": 640, "height": 900},
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.console_lines = []
            page.on("console", lambda m: page.console_lines.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: page.console_lines.append(f"pageerror: {e}"))
            yield page
        finally:
            await context.close()


def avatar_similarity(png: bytes, avatar_frame_bgr) -> float:
    """Correlation of a screenshot of the <video> element with an avatar frame (gray, resized to
    the frame): > 0.8 means the page shows the avatar (up to pose and codec), not a blank box."""
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or min(image.shape) < 100:
        raise AssertionError(f"the screenshot is not an image of the video element ({None if image is None else image.shape})")
    h, w = avatar_frame_bgr.shape[:2]
    shown = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    avatar = cv2.cvtColor(avatar_frame_bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    return float(np.corrcoef(shown.ravel(), avatar.ravel())[0, 1])
