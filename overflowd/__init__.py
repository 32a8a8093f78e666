"""overflowd: sampled, signed flow reports sent to the source and destination of a flow.

The package never does I/O at import time; see DESIGN.md for the layering.
"""

__version__ = "0.1.0"
