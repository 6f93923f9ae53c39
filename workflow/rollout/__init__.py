"""Rollout: canary checks, Kubernetes manifests, promotion and rollback."""
