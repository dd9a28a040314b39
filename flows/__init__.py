"""The Prefect wiring: the pipeline flow, its stage tasks and their launchers. No training stack here."""
