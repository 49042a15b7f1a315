"""The model: backbone, poly-attention, THE score, MoE fusion, LoRA, checkpoints."""
