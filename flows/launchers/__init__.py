"""How a stage's program gets started. The pipeline only needs `launch` to run `rlhf stage NAME --config URI`
somewhere and report how it ended (`launcher`): in a local process (`process`), or as a flow run of the stage's
Prefect deployment on a process, Docker or Kubernetes work pool (`deployment`), with the GPUs the config asks for."""
