"""Checkpoint stores: where each partition's position and open-window state are kept."""
