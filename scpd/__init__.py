"""scpd: a watch-folder daemon that pushes every new or changed file to SSH hosts."""

__version__ = "0.1.0"
