"""xpr — a command-line toolkit for phase retrieval (FXS, CDI, electron imaging)."""

__version__ = "0.1.0"
