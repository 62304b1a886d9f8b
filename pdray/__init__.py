"""pdray: PixelDefend (Song et al., ICLR 2018) as a distributed evaluation system on Ray.

Data flows data -> attacks -> pixelcnn / purify -> pipeline -> report; the CLI and the
jobs are thin shells over these modules. Pixel space is uint8 0..255, NHWC, at every
boundary.
"""

from pdray.errors import PdrayError

__all__ = ["PdrayError"]
__version__ = "0.1.0"
