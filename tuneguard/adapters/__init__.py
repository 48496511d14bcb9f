"""Adapters on a frozen backbone: PEFT configs per method, layer freezing schedules, merge/export."""
