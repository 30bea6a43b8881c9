"""The gateway's routes, one module per API; each is a FastAPI router that create_app includes."""
