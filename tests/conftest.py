"""Fixtures shared by every test package."""
import pytest

from .e2e import netns
from .support import require_netns


@pytest.fixture(scope="session")
def _netns_ready():
    """Check prerequisites once per session and sweep namespaces of dead runs."""
    require_netns()
    netns.remove_stale_namespaces()
