"""Compute schedules: which steps run the full network."""

from recache.schedule.schedule import Schedule, check_budget

__all__ = ["Schedule", "check_budget"]
