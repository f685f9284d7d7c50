"""The control plane: the discovery protocol, the control client in the proxy, and the control server."""
