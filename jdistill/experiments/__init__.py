"""Research on top of the library: the task world, the support-overlap experiment, the demo."""
