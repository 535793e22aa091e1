"""Online service: click history -> fold-in -> top-N over HTTP."""
