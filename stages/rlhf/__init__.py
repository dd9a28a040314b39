"""Reinforcement learning from human feedback: rollouts, the one reward readout, PPO and its math, rejection
sampling, DPO, GRPO/RLOO and the multi-aspect reward model. Each algorithm is one module named in the registry."""
