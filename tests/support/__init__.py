"""Helpers shared by the test suites (e.g. offline-built Docker test images)."""
