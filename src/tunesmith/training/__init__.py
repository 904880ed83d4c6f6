"""Shared training machinery for the stages: setup from config, the trainer, final outputs."""
