
DEFAULT_PORT = 7861
"""Where `tunelab board` listens unless --port says otherwise (docs/TRAINING.md, README.md say it too)."""
