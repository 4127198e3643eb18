// Watch-only WHEP viewer of /watch/<session-or-channel>: POST the offer to /whep/<channel>
// (application/sdp), play what comes back, DELETE the Location when the page goes away.
// window.viewer holds the state (tests read it). ?token=... is sent as a bearer token.
// The player itself is receive.js.
"use strict";

const channel = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const token = new URLSearchParams(location.search).get("token");
const auth = token ? { Authorization: `Bearer ${token}` } : {};
const video = document.getElementById("avatar");
const viewer = (window.viewer = { state: "connecting", framesDecoded: 0, error: null, location: null });
document.getElementById("channel").textContent = channel;
muteButton(document.getElementById("unmute"), video);

async function whepSignal(offerSdp) {
  const response = await fetch(`/whep/${encodeURIComponent(channel)}`, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", ...auth },
    body: offerSdp,
  });
  if (response.status !== 201) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || `HTTP ${response.status}`);
  }
  viewer.location = response.headers.get("Location");
  window.addEventListener("pagehide", () => {
    fetch(viewer.location, { method: "DELETE", headers: auth, keepalive: true });
  });
  return response.text();
}

playAvatar({ video, statusText: document.getElementById("status"), state: viewer, signal: whepSignal });
