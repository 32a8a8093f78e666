"""Command-line interfaces: ``overflowd``, ``overflowd-query`` (and later ``overflowd-receive``).

Each is ``main(argv=None) -> int``: exit 0 on success, 1 for our errors (one line on stderr),
2 for usage errors (argparse).
"""
