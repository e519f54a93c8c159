"""Offline checks of ferry's Kubernetes objects: strict validation and chart rendering."""
