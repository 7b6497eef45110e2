"""emo-stream server: networking around the emo_stream library (WebRTC, WebSocket, pages, OBS)."""
