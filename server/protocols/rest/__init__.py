"""REST front ends: thin ASGI adapters over the data plane."""
