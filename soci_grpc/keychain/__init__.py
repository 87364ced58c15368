"""Registry credential keychains (Docker config, CRI, Kubernetes secrets) and the chain that orders them."""
