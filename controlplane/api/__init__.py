"""The REST API edge: a Flask app over the controller's snapshot, store and loop."""

API_HEADER = "X-Controlplane-Api"
"""On every reply, so a client can tell this API from nginx or anything else on a port."""
