"""The bottom layer: clock, errors, events, retry and lifecycle helpers every layer uses."""
