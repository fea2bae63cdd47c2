"""One module per group of routes (see DESIGN.md's API table)."""
