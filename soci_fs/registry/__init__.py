"""OCI distribution client: references, the auth flow, range reads and pushes."""
