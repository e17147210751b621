"""The drain: workers that take due messages from Redis and deliver them to the Cloud API."""
