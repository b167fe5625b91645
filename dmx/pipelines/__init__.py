"""End-to-end experiments behind the ``dmx`` commands."""
