"""Watching runs: stage events into Prefect artifacts, the terminal view and summaries, run heartbeats."""
