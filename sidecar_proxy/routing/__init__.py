"""Route tables compiled per snapshot: match a request head, choose an action."""
