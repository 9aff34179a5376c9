"""Deterministic S3-backed multimodal data pipeline."""
