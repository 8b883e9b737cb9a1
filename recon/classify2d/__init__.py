"""Streaming reference-free 2D classification (knows nothing of the daemon).

Modules, one idea each: :mod:`.fourier_sampling` (a particle's spectrum at any
frequency), :mod:`.inplane_search` (scores over rotations and shifts), :mod:`.class_sums`
(exact add / remove of what a particle contributes), :mod:`.class_delta` (classes shared by a lead
classifier and its followers on other processes), :mod:`.references` (FRC, Wiener
averages, mask, centre), :mod:`.classifier` (the incremental EM), :mod:`.junk_score`
(which classes are junk), :mod:`.class_set` (what users see).
"""

from .class_delta import ClassDelta, ClassReferences
from .class_set import ClassSet, class_set, particle_columns, particle_junk
from .classifier import ClassifierSettings, StreamingClassifier

__all__ = [
    "ClassDelta",
    "ClassReferences",
    "ClassSet",
    "ClassifierSettings",
    "StreamingClassifier",
    "class_set",
    "particle_columns",
    "particle_junk",
]
