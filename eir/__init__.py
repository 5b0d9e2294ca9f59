"""eir: continual semantic segmentation with Enhanced Instance Replay on Ray."""
