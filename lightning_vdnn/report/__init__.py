"""What a step did with memory: the report, its table and plot."""
