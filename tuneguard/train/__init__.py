"""Training: the loop (``loop.py``), its losses, the exact fast path, the memory plan and checkpoints.

``train.loop.train`` is the entry point; ``tuneguard.run`` puts evaluation and reports after it.
"""
