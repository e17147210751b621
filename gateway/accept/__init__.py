"""The accept path: validating sends and queueing them in Redis."""
