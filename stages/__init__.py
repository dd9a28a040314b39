"""What runs inside a stage's process or container.

The stage programs are the modules at the top (`prepare`, `sft`, `reward`, `rl`, `evaluate`), each read top to
bottom like a recipe, with `runner` that runs one of them; below them a small library: `core` (torch-free, what
`flows` shares), `data`, `modeling`, `rlhf` and `tools`.
"""
