"""The budget accountant: hierarchical spend limits and rate limits that are never overspent."""
