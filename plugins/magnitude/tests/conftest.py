"""Fixtures for pytest; the helpers live in magnitude_testing (a module name of its own: every test
folder of the repository has a conftest)."""
