"""jfe — Jump to Full Encryption. Not built yet (see DESIGN.md); a placeholder so the
distribution ships the package name."""
