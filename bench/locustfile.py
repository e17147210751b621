"""Placeholder for the locust load test run by docker-compose.yml; it will be replaced."""
