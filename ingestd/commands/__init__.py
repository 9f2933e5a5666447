"""One-shot commands behind ``ingestd <command>``: CSV import and verification, stats, roles,
health, and their terminal output (``textui``). ``common`` holds what they share (opening the
database with a bounded timeout and one-line errors)."""
