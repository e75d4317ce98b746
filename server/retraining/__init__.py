"""Retraining: triggers, the job queue and its workers, training, the gate, packaging, promotion.

A layer above the core (``server.core``) and the monitor (``monitoring``): it reads what the
monitor measured and uses the registry and data plane to put a new version into traffic. The
protocol adapters call it; it never imports them.
"""
