"""Compute schedules: which steps run the full network."""

from recache.schedule.budget import Budget, check_budget_form, resolve_budget
from recache.schedule.planner import SchedulePlanner
from recache.schedule.schedule import Schedule, check_budget, spread_steps, steps_at_noise_levels

__all__ = ["Budget", "Schedule", "SchedulePlanner", "check_budget", "check_budget_form", "resolve_budget",
           "spread_steps", "steps_at_noise_levels"]
