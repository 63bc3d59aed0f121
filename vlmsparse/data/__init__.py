"""Data: files and records, finetuning data sets, calibration sets, the synthetic VQA task (layer 4 of
docs/ARCHITECTURE.md)."""
