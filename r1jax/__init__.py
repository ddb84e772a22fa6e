"""r1jax: DeepSeek-R1 training in JAX.

Public modules: `r1jax.grpo` (the loss; imports only jax and numpy), `r1jax.model`
(Flax NNX transformer + HF checkpoints), `r1jax.sharding`, `r1jax.sampling`, `r1jax.rewards`.
Nothing heavy is imported here, so `import r1jax.grpo` stays light.
"""

__version__ = "0.1.0"
