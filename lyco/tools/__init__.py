"""Command-line tools (lyco-inspect, ...)."""
