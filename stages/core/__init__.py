"""The torch-free runtime both sides share: the config schema, the registry of stages and algorithms, the store,
artifacts and their cache keys, checkpoints, the planner, errors and progress events. `flows` imports only this."""
