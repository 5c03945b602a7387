"""OpenAI's Realtime API over a pipeline of Hearth's own models: voice activity detection, transcription, a chat
model and a voice (LocalAI's `pipeline:`). `session.py` keeps a conversation's state and speaks the protocol;
`api/realtime.py` is the WebSocket route in front of it."""
