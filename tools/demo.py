"""Placeholder: the lead replaces this with the real demo."""

print("demo: not yet")
