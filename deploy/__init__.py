"""Offline checks of ferry's Kubernetes objects: strict validation (k8s_validate) and chart rendering (chart)."""
