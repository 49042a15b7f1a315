"""Batch inference: length-sorted encoding, oneDNN-packed and int8 CPU copies."""
