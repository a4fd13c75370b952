"""``hydra/sweeper=capacity``: the capacity search as a Hydra sweeper (see ``capacity_sweeper``)."""
