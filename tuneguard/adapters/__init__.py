"""Adapters on a frozen backbone: the method registry (one entry per adapter method), layer freezing
schedules, the frozen-backbone checksum, merge/export."""
