"""The wire format: what producers send and what ingestd stores, as data.

Event types and their fields (``tables``), decoding and validation (``events``, the ``fastpath``
for well-formed events, ``decoding`` choosing between them), the Redis key names (``keys``), the
mirror's value format (``mirror_format``) and the producers' CSV files (``csv_format``). Nothing
here does I/O or imports the daemon, the producer library, the commands or the tooling.
"""
