"""Fixtures for pytest; the helpers live in sbnn_testing (a module name of its own: every test folder
of the repository has a conftest, so `from sbnn_testing import` would pick up the wrong one)."""
from sbnn_testing import *  # noqa: F401,F403
