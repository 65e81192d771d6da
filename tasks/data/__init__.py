"""The data phase: reading datasets in blocks, recognising and converting their formats,
checking them against each method's schema, and measuring them in tokens."""
