"""Pipeline schedules: what each rank runs, in which order, and what it keeps in flight."""
