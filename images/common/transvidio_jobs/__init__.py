"""The job pipeline shared by the backend (short jobs) and the MPI master (long jobs)."""
