"""The example networks, one module each, so an archive can carry its network as ``--model-file``."""
