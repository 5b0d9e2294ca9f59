"""eir: continual semantic segmentation with Enhanced Instance Replay on Ray."""

__version__ = "0.1.0"
