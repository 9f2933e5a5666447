"""The fuzz campaign: valid, mutated and random events through a real ``ingestd run``.

``generate`` builds the cases (each with the fate the wire format promises it), ``oracle``
judges what the database and Redis hold against them, ``campaign`` runs the daemon, the
producers and the in-process service, and prints the figures (``ingestd bench --fuzz``).
"""
