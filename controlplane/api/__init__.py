"""The REST API edge: a Flask app over the controller's snapshot, store and loop."""
