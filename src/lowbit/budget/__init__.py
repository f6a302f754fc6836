"""The byte budget: sensitivities, the knapsack, the planner and the automatic pipeline."""
