"""The reserved values of label maps, shared by every layer that reads or writes them."""

IGNORE_LABEL = 255  # a pixel no loss or metric counts (unlabelled, void, a future class in disjoint)
NO_PASTE = 255  # paste-class value of a pixel that received no pasted instance
