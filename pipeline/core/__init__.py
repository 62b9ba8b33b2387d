"""What every step shares: errors, atomic writes, locks, locations, device and dtype, ranks, progress, seeds."""
