// Receive-only WebRTC player shared by the watch pages (whep.js: WHEP viewers of a session;
// watch.js: the `live --mic` preview). It offers recvonly video + audio, waits for ICE gathering
// (aiortc has no trickle ICE), hands the complete offer SDP to `signal(sdp) -> answer SDP`, plays
// what comes back in `video`, and keeps `state.state` / `state.framesDecoded` / `state.error`
// current (tests read them). Returns the RTCPeerConnection.
"use strict";

const ICE_GATHERING_TIMEOUT_MS = 3000;

function showState(state, statusText, value) {
  state.state = value;
  statusText.textContent = value;
}

async function receiveAvatar({ video, statusText, state, signal }) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const remote = new MediaStream();
  pc.addEventListener("track", (event) => {
    remote.addTrack(event.track);
    video.srcObject = remote;
    video.play().catch(() => {});
  });
  pc.addEventListener("connectionstatechange", () => showState(state, statusText, pc.connectionState));
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
  await pc.setRemoteDescription({ type: "answer", sdp: await signal(pc.localDescription.sdp) });
  setInterval(async () => {
    for (const report of (await pc.getStats()).values()) {
      if (report.type === "inbound-rtp" && report.kind === "video") state.framesDecoded = report.framesDecoded || 0;
    }
  }, 500);
  return pc;
}

// The pages start muted (browsers play sound only after a click; the preview would feed the mic).
function muteButton(button, video) {
  button.addEventListener("click", () => {
    video.muted = !video.muted;
    button.textContent = video.muted ? "Unmute" : "Mute";
  });
}

function playAvatar(options) {
  const { statusText, state } = options;
  return receiveAvatar(options).catch((error) => {
    state.error = String(error);
    showState(state, statusText, `failed: ${error.message || error}`);
  });
}
