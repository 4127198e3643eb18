// Watch-only preview of a session running on the server's machine (`live --mic`): receives its
// video and audio over WebRTC, sends nothing. window.preview holds the state (tests read it).
"use strict";

const ICE_GATHERING_TIMEOUT_MS = 3000;
const video = document.getElementById("avatar");
const statusText = document.getElementById("status");
const preview = (window.preview = { state: "connecting", framesDecoded: 0, error: null });

function setState(state) {
  preview.state = state;
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
  const response = await fetch("offer", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  await pc.setRemoteDescription(body);
  setInterval(async () => {
    for (const report of (await pc.getStats()).values()) {
      if (report.type === "inbound-rtp" && report.kind === "video") preview.framesDecoded = report.framesDecoded || 0;
    }
  }, 500);
}

document.getElementById("unmute").addEventListener("click", (event) => {
  video.muted = !video.muted;
  event.target.textContent = video.muted ? "Unmute" : "Mute";
});

watch().catch((error) => {
  preview.error = String(error);
  setState(`failed: ${error.message || error}`);
});
