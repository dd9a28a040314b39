"""What users run beside the pipeline: `rlhf compare` and `rlhf chat`, `rlhf validate`."""
