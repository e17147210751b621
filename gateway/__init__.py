"""WhatsApp send gateway: accepts sends over HTTP, queues them per phone number in Redis and
drains each number to the WhatsApp Cloud API at its throughput tier."""

__version__ = "0.3.0"
