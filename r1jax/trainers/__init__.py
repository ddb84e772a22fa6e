"""Training loops: GRPO (`rl`) and supervised fine-tuning (`sft`), over shared jitted steps (`steps`)."""
