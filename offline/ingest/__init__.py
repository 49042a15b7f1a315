"""Ingest: input files -> catalog rows (records.py parses, formats.py maps, job.py writes)."""
