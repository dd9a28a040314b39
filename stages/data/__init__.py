"""Datasets: the public formats read into TRL's conversational rows, the sources a config names, the demo task."""
