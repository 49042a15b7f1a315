"""Training: the one loop every method runs in, SFT's losses and trainer."""
