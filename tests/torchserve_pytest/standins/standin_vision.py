"""Stand-in for the parts of torchvision and ts.torch_handler.image_classifier the examples use.

torchvision (and captum, which TorchServe's VisionHandler imports) are not installed on the
machines these tests run on, so TorchServe's own image handlers cannot load there. This module
gives the example handlers the same names (``transforms.Compose/ToTensor/Normalize/Resize``,
``ImageClassifier``) built on PIL and torch only; archives carry it as an extra file.
"""

import base64
import io

import torch
import torch.nn.functional as F
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import map_class_to_label


class _Compose:
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class _ToTensor:
    def __call__(self, image):
        t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float() / 255.0
        channels = len(image.getbands())
        return t.reshape(image.height, image.width, channels).permute(2, 0, 1).contiguous()


class _Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, t):
        return (t - self.mean) / self.std


class _Resize:
    def __init__(self, size):
        self.size = size if isinstance(size, (tuple, list)) else (size, size)

    def __call__(self, image):
        return image.resize((self.size[1], self.size[0]))


class transforms:  # noqa: N801 - torchvision's module name
    Compose = _Compose
    ToTensor = _ToTensor
    Normalize = _Normalize
    Resize = _Resize


class ImageClassifier(BaseHandler):
    """TorchServe's ImageClassifier without torchvision: image bytes (or base64 text) -> top-k labels."""

    topk = 5
    image_processing = transforms.Compose([transforms.Resize(32), transforms.ToTensor(),
                                           transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def preprocess(self, data):
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)
            image = Image.open(io.BytesIO(image))
            image = image.convert("L" if self._grey() else "RGB")
            images.append(self.image_processing(image))
        return torch.stack(images).to(self.device)

    def _grey(self):
        first = self.image_processing.steps[-1]
        return isinstance(first, _Normalize) and first.mean.numel() == 1

    def set_max_result_classes(self, topk):
        self.topk = topk

    def postprocess(self, data):
        ps = F.softmax(data, dim=1)
        probs, classes = torch.topk(ps, min(self.topk, ps.shape[1]), dim=1)
        return map_class_to_label(probs.tolist(), self.mapping, classes.tolist())
