"""Test harnesses that run real external parts on loopback: a registry (htpasswd or token auth), a token
server, and a fault-injecting proxy. Importable by any test package; nothing here runs at import time."""
