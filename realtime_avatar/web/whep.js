// Watch-only WHEP viewer of /watch/<session-or-channel>: POST the offer to /whep/<channel>
// (application/sdp), play what comes back, DELETE the Location when the page goes away.
// window.viewer holds the state (tests read it). ?token=... is sent as a bearer token.
"use strict";

const ICE_GATHERING_TIMEOUT_MS = 3000;
const channel = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const token = new URLSearchParams(location.search).get("token");
const auth = token ? { Authorization: `Bearer ${token}` } : {};
const video = document.getElementById("avatar");
const statusText = document.getElementById("status");
const viewer = (window.viewer = { state: "connecting", framesDecoded: 0, error: null, location: null });
document.getElementById("channel").textContent = channel;

function setState(state) {
  viewer.state = state;
  statusText.textContent = state;
}

async function watch() {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const remote = new MediaStream();
  pc.addEventListener("track", (event) => {
    remote.addTrack(event.track);
    video.srcObject = remote;
    video.play().catch(() => {});
  });
  pc.addEventListener("connectionstatechange", () => setState(pc.connectionState));
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    setTimeout(resolve, ICE_GATHERING_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") resolve();
    });
  });
  const response = await fetch(`/whep/${encodeURIComponent(channel)}`, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", ...auth },
    body: pc.localDescription.sdp,
  });
  if (response.status !== 201) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || `HTTP ${response.status}`);
  }
  viewer.location = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  window.addEventListener("pagehide", () => {
    fetch(viewer.location, { method: "DELETE", headers: auth, keepalive: true });
  });
  setInterval(async () => {
    for (const report of (await pc.getStats()).values()) {
      if (report.type === "inbound-rtp" && report.kind === "video") viewer.framesDecoded = report.framesDecoded || 0;
    }
  }, 500);
}

document.getElementById("unmute").addEventListener("click", (event) => {
  video.muted = !video.muted;
  event.target.textContent = video.muted ? "Unmute" : "Mute";
});

watch().catch((error) => {
  viewer.error = String(error);
  setState(`failed: ${error.message || error}`);
});
