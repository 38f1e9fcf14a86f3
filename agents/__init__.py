"""Agents that act through a learned world model: sampling planners (CEM, MPPI) over action sequences."""

from selfflow_world.agents.planners import Plan, cem, colored_noise, mppi, shift_plan, with_action_cost

__all__ = ["Plan", "cem", "colored_noise", "mppi", "shift_plan", "with_action_cost"]
