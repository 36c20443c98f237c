"""Resource plans: what a run will need of disk, memory and time, before it starts."""
