"""The HTTP gateway: an OpenAI-compatible API and the web chat page in front of the nightcap gRPC services."""
