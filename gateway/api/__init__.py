"""The HTTP API of API.md: routes, auth, errors, and the operations endpoints."""
