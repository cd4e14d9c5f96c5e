"""Clients for the relays the portal can sit in front of, one module per kind (issue 16).

Only `crs` (claude-relay-service) is here so far; nothing in the portal uses it yet.
"""
