"""The Kubernetes operator: reconciles ModelDeployment resources (kopf)."""
