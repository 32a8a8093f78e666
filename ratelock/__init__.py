"""ratelock — rate-limited password and record oracle. Not built yet (see DESIGN.md)."""
