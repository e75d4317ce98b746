"""Handler of the stand-in image classifiers: TorchServe's image_classifier (top-5 labels with their
probabilities) on PIL and torch, since torchvision and captum are not installed (standin_vision)."""

from standin_vision import ImageClassifier


class StandinImageClassifier(ImageClassifier):
    pass
