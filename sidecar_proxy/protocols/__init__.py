"""Protocols a connection can speak once detected: tcp (the relay) and HTTP."""
