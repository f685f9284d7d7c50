"""Traffic interception: the iptables rules that send the pod's TCP through the proxy.

``options`` turns ``init-iptables`` flags into validated options, ``rules``
turns options and the current ``iptables-save`` output into
``iptables-restore`` scripts (both pure); ``apply`` runs them.
"""
