"""Training methods: one file each, built on kdflow.losses, kdflow.data and kdflow.models."""
