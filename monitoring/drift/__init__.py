"""Drift: reference profiles, per-feature scores, windows and episodes (pure, no threads).

``monitoring.monitor.Monitor`` runs them in its background thread; the store keeps the state.
"""

from .profile import PROFILE_FILE, ProfileError, build_profile, load_profile, save_profile, validate_profile

__all__ = ["PROFILE_FILE", "ProfileError", "build_profile", "load_profile", "save_profile", "validate_profile"]
