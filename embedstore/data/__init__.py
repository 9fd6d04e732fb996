"""Data files shipped with embedstore (read with importlib.resources)."""
