"""Alignment as tasks of the one training loop: preference losses (DPO, SimPO, ORPO, KTO), reward
models (Bradley-Terry) and RL from rewards (GRPO, RLOO). `plinth align` runs them.

    plinth align configs/dpo-smollm2-lora.yaml
"""
