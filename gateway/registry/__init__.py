"""The phone-number registry: records, their rate in force, and lifecycle changes."""

from gateway.registry.service import Registry

__all__ = ["Registry"]
