"""RoDPO alignment: the policy (LoRA + MoE over the SFT model), DPO, its trainer."""
