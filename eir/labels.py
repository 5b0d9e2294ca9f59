"""The reserved values of label maps, shared by every layer that reads or writes them."""

IGNORE_LABEL = 255  # a pixel no loss or metric counts (unlabelled, void, a future class in disjoint)
NO_PASTE = 255  # paste-class value of a pixel that received no pasted instance
# A background pixel whose pseudo-label PLOP's entropy rule rejected (`pseudo.rule=median_entropy`). Not
# 255: the CE ignores both, but PLOP's classifier adaptive factor counts these pixels (accepted background
# pixels / background pixels per image), so they must stay distinguishable from void after cropping. Only
# that rule writes it and only `eir.methods.plop` reads it; every other loss refuses it as a class outside
# the model's channels (`eir.losses`), so a label map carrying it can never be trained on silently.
REJECTED_PSEUDO = 254
