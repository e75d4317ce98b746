"""Monitoring: Prometheus metrics on an injected registry, dashboards and alert rules."""
