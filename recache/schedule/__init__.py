"""Compute schedules: which steps run the full network."""

from recache.schedule.budget import Budget, check_budget_form, resolve_budget
from recache.schedule.schedule import Schedule, check_budget

__all__ = ["Budget", "Schedule", "check_budget", "check_budget_form", "resolve_budget"]
