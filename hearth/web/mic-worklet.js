// The voice tab's microphone tap: each block of samples the AudioContext reads goes to the page, which sends it.
class MicrophoneTap extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("microphone-tap", MicrophoneTap);
