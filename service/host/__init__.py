"""What the machine gives the process: usable CPUs, memory handed back, child processes and the user's files."""
